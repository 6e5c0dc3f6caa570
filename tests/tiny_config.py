"""The smallest segmentation experiment the runtime tests train (seconds per round)."""

TINY = {
    "model.channels": "4,8,16",
    "data.image-size": 32,
    "data.samples-per-site": 12,
    "data.num-sites": 3,
    "train.batch-size": 4,
}
