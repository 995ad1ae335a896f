"""One mask to levelled discs (isolate) and each disc to millimetres (geometry). Pure numpy."""
