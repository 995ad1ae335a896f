"""The disc segmenter: models, preprocessing, training (Ray Train), streaming inference and
extraction (Ray Data), and the Dice/IoU both share. Inference never imports training."""
