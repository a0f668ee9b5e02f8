"""Constants of the data path: normalisation statistics, split names, image suffixes, column names."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Google's ViT checkpoints (model_type "vit") were trained on inputs scaled to [-1, 1].
VIT_MEAN = (0.5, 0.5, 0.5)
VIT_STD = (0.5, 0.5, 0.5)

SPLIT_NAMES = ("train", "test", "validation")
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
IMAGE_COLUMN_NAMES = ("img", "image")
LABEL_COLUMN_NAMES = ("label", "labels")
# Up to this many items, a torch data set's labels are all checked up front (one __getitem__ per item).
MAX_TORCH_ITEMS_TO_SCAN = 50_000
