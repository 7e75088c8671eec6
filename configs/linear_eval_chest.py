"""Linear evaluation of a pretraining checkpoint on the synthetic chest phantom.

python linear_eval.py --config=configs/linear_eval_chest.py:demo \
    --config.pretrain_workdir=workdirs/isimed_chest_demo --workdir=workdirs/isimed_chest_demo/eval

The data set, crop size and encoder come from the pretraining checkpoint's stored config.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = common.preset(arg, ("paper", "demo", "test"))
    c = ml_collections.ConfigDict()
    c.pretrain_workdir = ml_collections.config_dict.placeholder(str)
    c.checkpoint = "latest"  # "latest", "best" (highest validation Spearman logged) or a step number.
    c.seed = 0
    common.distributed(c)
    c.data_dir = ml_collections.config_dict.placeholder(str)  # Overrides the pretraining data dir.

    # Crop-level lesion classification (the paper's protocol): K crops per evaluation subject, a
    # share of them centred on lesion voxels; label = the crop contains lesion.
    c.eval_split = "test"
    c.crops_per_image = 64
    c.lesion_share = 0.39
    c.max_images = 1000
    # Subjects of the training split give the kNN and position-probe training sets.
    c.reference_split = "train"
    c.reference_images = 64

    c.folds = 5
    c.val_fraction = 0.2
    c.probe = ml_collections.ConfigDict()
    c.probe.epochs = 100
    c.probe.learning_rate = 1e-2
    c.probe.weight_decays = (0.0, 1e-4, 1e-3, 1e-2, 1e-1)
    c.probe.batch_size = 256
    c.knn_k = 20
    c.raw_pool = 2  # Raw-intensity reference features: crops average-pooled by this factor.

    # Context tasks, where the records carry structure labels (the phantom): nodule crops against
    # hard negatives (crops centred on vessels, pleura, lung), the structure at the crop centre,
    # image-level nodule presence from lung crops. Crop tasks on crop_splits, the image task on
    # image_splits (it needs many subjects); crops per subject below.
    c.context = ml_collections.ConfigDict()
    c.context.enabled = True
    c.context.crop_splits = ("validation", "test")
    c.context.image_splits = ("train", "validation", "test")
    c.context.max_images = 1000  # per split
    c.context.positives = 16  # crops centred on nodule voxels
    c.context.negatives = 8  # per kind: vessel, pleura, lung centres (crops free of nodule)
    c.context.anatomy = 3  # per structure present
    c.context.image = 32  # lung-centred crops per subject for the image-level task

    if preset == "demo":
        c.reference_images = 32
    elif preset == "test":
        c.crops_per_image = 16
        c.reference_images = 8
        c.folds = 3
        c.probe.epochs = 20
        c.probe.weight_decays = (0.0, 1e-2)
        c.context.positives, c.context.negatives, c.context.anatomy, c.context.image = 6, 3, 2, 8
    return c
