"""The chest phantom's structure label map, which its 3D records carry as `structures` (uint8):
what the generator (`isimed.data.phantom`) paints and the context tasks
(`isimed.evaluation.context_tasks`) pose questions on, without either importing the other."""

from __future__ import annotations

import numpy as np

STRUCTURES: dict[str, int] = {
    "background": 0,
    "body": 1,  # soft tissue / muscle, also the abdomen below the diaphragm
    "fat": 2,  # subcutaneous and mediastinal fat
    "lung_left": 3,
    "lung_right": 4,
    "heart": 5,
    "aorta": 6,
    "trachea": 7,  # with the two main bronchi
    "spine": 8,
    "ribs": 9,
    "liver": 10,
    "nodule": 11,
    "vessel": 12,  # pulmonary arteries and veins: a tapering tree from each hilum
}
LUNGS = (STRUCTURES["lung_left"], STRUCTURES["lung_right"])


def pleura_mask(labels: np.ndarray) -> np.ndarray:
    """Lung voxels with a face neighbour in the chest wall or diaphragm (soft tissue or rib)."""
    wall = (labels == STRUCTURES["body"]) | (labels == STRUCTURES["ribs"])
    near = np.zeros(labels.shape, bool)
    for axis in range(labels.ndim):
        n = labels.shape[axis]
        lo = [slice(None)] * labels.ndim
        hi = [slice(None)] * labels.ndim
        lo[axis], hi[axis] = slice(0, n - 1), slice(1, n)
        near[tuple(lo)] |= wall[tuple(hi)]
        near[tuple(hi)] |= wall[tuple(lo)]
    return near & np.isin(labels, LUNGS)
