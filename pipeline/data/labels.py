"""SPIDER's label map, spelled out once so no module guesses label meanings.

Vertebrae are counted from the bottom (1 = L5 in a spine with five lumbar vertebrae), discs too
(201 = L5/S1). Other tools (SPINEPS) give 100 another meaning: always go through these names.
"""

VERTEBRA_MIN, VERTEBRA_MAX = 1, 25
CANAL = 100
PARTIAL_VERTEBRA_MIN, PARTIAL_VERTEBRA_MAX = 101, 125
DISC_MIN, DISC_MAX = 201, 225

_VERTEBRAE_FROM_BOTTOM = ["L5", "L4", "L3", "L2", "L1"] + [f"T{k}" for k in range(12, 0, -1)]
_VERTEBRAE_FROM_BOTTOM += [f"C{k}" for k in range(7, 0, -1)]


def is_disc(label: int) -> bool:
    return DISC_MIN <= int(label) <= DISC_MAX


def is_known(label: int) -> bool:
    """Whether a value may appear in a SPIDER mask (0 is background)."""
    label = int(label)
    return (
        label == 0
        or VERTEBRA_MIN <= label <= VERTEBRA_MAX
        or label == CANAL
        or PARTIAL_VERTEBRA_MIN <= label <= PARTIAL_VERTEBRA_MAX
        or is_disc(label)
    )


def level_name(ivd_label: int) -> str:
    """Level of disc label 200+k: the k-th disc from the bottom, so 201 -> 'L5/S1'."""
    if not is_disc(ivd_label):
        raise ValueError(f"{ivd_label} is not a disc label ({DISC_MIN}-{DISC_MAX})")
    k = int(ivd_label) - DISC_MIN
    upper = _VERTEBRAE_FROM_BOTTOM[k]
    lower = "S1" if k == 0 else _VERTEBRAE_FROM_BOTTOM[k - 1]
    return f"{upper}/{lower}"


def vertebrae_of_disc(ivd_label: int) -> tuple[int, int]:
    """Labels (lower, upper) of the vertebral bodies bounding a disc; lower 0 means the sacrum,
    which SPIDER does not label."""
    k = int(ivd_label) - DISC_MIN
    return (k, k + 1)
