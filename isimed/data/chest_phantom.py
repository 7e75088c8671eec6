"""TFDS builder for the synthetic chest phantom, stored as array_record.

The phantom is SYNTHETIC (see `isimed.data.phantom`): it exists so the project runs on a fresh
machine and tests have ground truth. It is generated locally in seconds on first use into the data
directory the config names, and read back with `tfds.data_source` (no TensorFlow needed).

Splits are disjoint by construction: subject indices `[0, n_train)` are train, the next
`n_validation` validation, the next `n_test` test. Record order in array_record files is not
generation order, so every record carries its subject index as `id`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from isimed.data import layouts
from isimed.data import phantom


@dataclasses.dataclass(eq=False)
class ChestPhantomConfig(tfds.core.BuilderConfig):
    spec: phantom.PhantomSpec = phantom.PhantomSpec()
    view: str = "3d"  # "3d" volumes or "coronal" 2D projections (X-ray-like)
    num_subjects: tuple[int, int, int] = (64, 16, 16)  # train, validation, test
    seed: int = 0


def _config(name: str, view: str, spec: phantom.PhantomSpec, num_subjects, description: str):
    return ChestPhantomConfig(
        name=name,
        view=view,
        spec=spec,
        num_subjects=num_subjects,
        description=description,
        version=tfds.core.Version("1.0.0"),
    )


_DEMO = phantom.PhantomSpec()
_LARGE = phantom.PhantomSpec(shape=(128, 192, 192), spacing=(2.5, 1.75, 1.75))


class ChestPhantom(tfds.core.GeneratorBasedBuilder):
    """Synthetic thorax CT phantom with lung-nodule masks (not real patient data)."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [
        _config("demo3d", "3d", _DEMO, (64, 16, 16), "64x96x96 voxels, 5x3.5x3.5 mm"),
        _config("demo2d", "coronal", _DEMO, (64, 16, 16), "coronal projections of demo3d"),
        _config("large3d", "3d", _LARGE, (200, 50, 50), "128x192x192 voxels, 2.5x1.75x1.75 mm"),
        _config("large2d", "coronal", _LARGE, (200, 50, 50), "coronal projections of large3d"),
        _config(
            "tiny3d",
            "3d",
            phantom.PhantomSpec(shape=(32, 48, 48), spacing=(10.0, 7.0, 7.0)),
            (12, 4, 12),
            "tests: 32x48x48 voxels, 10x7x7 mm",
        ),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        cfg: ChestPhantomConfig = self.builder_config
        shape = tuple(cfg.spec.shape)
        if cfg.view == "coronal":
            shape = (shape[0], shape[2])
        ndim = len(shape)
        return tfds.core.DatasetInfo(
            builder=self,
            description="SYNTHETIC procedural thorax CT phantom (HU) with lung-nodule masks.",
            features=tfds.features.FeaturesDict(
                {
                    "id": np.int32,
                    # Raw bytes: the default protobuf int64 list parses ~10x slower, and a float list
                    # would round the float64 affine to float32.
                    "image": tfds.features.Tensor(shape=shape, dtype=np.int16, encoding="bytes"),
                    "mask": tfds.features.Tensor(shape=shape, dtype=np.uint8, encoding="zlib"),
                    "affine": tfds.features.Tensor(
                        shape=(ndim + 1, ndim + 1), dtype=np.float64, encoding="bytes"
                    ),
                    "has_nodule": np.bool_,
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing is downloaded.
        counts = self.builder_config.num_subjects
        offsets = np.cumsum((0,) + tuple(counts))
        return {
            split: self._generate_examples(range(offsets[i], offsets[i + 1]))
            for i, split in enumerate(layouts.SPLIT_NAMES)
        }

    def _generate_examples(self, indices):
        cfg: ChestPhantomConfig = self.builder_config
        for index in indices:
            subject = phantom.generate_subject(cfg.spec, cfg.seed, int(index))
            if cfg.view == "coronal":
                subject = phantom.project_coronal(subject)
            yield (
                int(index),
                {
                    "id": int(index),
                    "image": subject["image"].astype(np.int16),
                    "mask": subject["mask"].astype(np.uint8),
                    "affine": subject["affine"].astype(np.float64),
                    "has_nodule": bool(np.any(subject["mask"])),
                },
            )


def data_source(config_name: str, split: str, data_dir: str):
    """Random-access source of one split, generating the data set first if it is missing."""
    builder = ChestPhantom(config=config_name, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return builder.as_data_source(split=split)
