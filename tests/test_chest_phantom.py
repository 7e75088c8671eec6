"""The TFDS builder: splits by subject, records equal to the generator, 2D variant, generation by
several processes at once."""

import os
import subprocess
import sys

import numpy as np

from isimed.data import chest_phantom
from isimed.data import layouts
from isimed.data import phantom


def test_splits_are_disjoint_by_subject_and_complete(phantom_dir):
    config = next(c for c in chest_phantom.ChestPhantom.BUILDER_CONFIGS if c.name == "tiny3d")
    ids = {}
    for split in layouts.SPLIT_NAMES:
        source = chest_phantom.data_source("tiny3d", split, phantom_dir)
        ids[split] = [int(source[i]["id"]) for i in range(len(source))]
        assert len(set(ids[split])) == len(ids[split])
    assert [len(ids[s]) for s in layouts.SPLIT_NAMES] == list(config.num_subjects)
    train, val, test = (set(ids[s]) for s in layouts.SPLIT_NAMES)
    assert not (train & val or train & test or val & test)
    assert train | val | test == set(range(sum(config.num_subjects)))


def test_records_equal_the_generator(phantom_dir):
    config = next(c for c in chest_phantom.ChestPhantom.BUILDER_CONFIGS if c.name == "tiny3d")
    source = chest_phantom.data_source("tiny3d", "validation", phantom_dir)
    record = source[0]
    subject = phantom.generate_subject(config.spec, config.seed, int(record["id"]))
    np.testing.assert_array_equal(record["image"], subject["image"])
    np.testing.assert_array_equal(record["mask"], subject["mask"])
    np.testing.assert_array_equal(record["affine"], subject["affine"])
    np.testing.assert_array_equal(record["structures"], subject["labels"])
    assert bool(record["has_nodule"]) == bool(subject["mask"].any())


def test_coronal_variant_is_2d(tmp_path):
    spec = phantom.PhantomSpec(shape=(24, 32, 32), spacing=(10.0, 8.0, 8.0))
    config = chest_phantom.ChestPhantomConfig(
        name="t2d", view="coronal", spec=spec, num_subjects=(2, 1, 1), version="1.0.0"
    )
    builder = chest_phantom.ChestPhantom(config=config, data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare()
    record = builder.as_data_source(split="test")[0]
    assert record["image"].shape == (24, 32) and record["affine"].shape == (3, 3)
    expected = phantom.project_coronal(phantom.generate_subject(spec, 0, int(record["id"])))
    np.testing.assert_array_equal(record["image"], expected["image"])


def test_processes_generating_at_once_all_get_the_data(tmp_path):
    # The processes of a multi-process run find the phantom missing at the same moment; each
    # used to generate it, and all but one failed renaming theirs into place (FileExistsError).
    code = (
        "import sys; from isimed.data import chest_phantom; "
        "s = chest_phantom.data_source('tiny3d', 'validation', sys.argv[1]); "
        "print(sorted(int(s[i]['id']) for i in range(len(s))))"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err.decode()[-2000:]
    config = next(c for c in chest_phantom.ChestPhantom.BUILDER_CONFIGS if c.name == "tiny3d")
    n_train, n_validation, _ = config.num_subjects
    validation = str(list(range(n_train, n_train + n_validation)))
    # The last line: TFDS announces the generation on stdout.
    assert [out.decode().splitlines()[-1] for out, _ in outputs] == [validation] * len(procs)
    assert [p.name for p in (tmp_path / "chest_phantom" / "tiny3d").iterdir()] == ["2.0.0"]
