"""Dataset sources: image folders with photos and multispectral arrays (.npy, .tif, any channel count,
native dtype), their disk cache, manifest CSVs (single- and multi-label, split column or seeded split,
metadata columns) and CIFAR-10 from a local copy, all from files the tests write."""

import csv
import os
import pickle

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from torchvision.datasets import cifar

from vitsweep.data import DataModule, imagefolder
from vitsweep.data.cifar10 import load_cifar10
from vitsweep.data.csv import load_csv
from vitsweep.data.imagefolder import load_imagefolder, read_array


def write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        np.save(path, array)
    elif path.suffix in (".tif", ".tiff"):
        tifffile.imwrite(path, array)
    else:
        Image.fromarray(array).save(path)
    return path


def multispectral_tree(root, size=8, bands=5):
    """train/{water,field}: band-first .npy and band-last .tif, uint16; test/ likewise. Returns the arrays
    as (C, H, W), by relative path."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in (("train", 6), ("test", 2)):
        for cls in ("field", "water"):
            for i in range(count):
                chw = rng.integers(0, 60000, (bands, size, size), dtype=np.uint16)
                if i % 2:
                    rel = f"{split}/{cls}/{i}.tif"
                    write(root / rel, chw.transpose(1, 2, 0))  # (H, W, C), how most GeoTIFF readers give bands
                else:
                    rel = f"{split}/{cls}/{i}.npy"
                    write(root / rel, chw)
                arrays[rel] = chw
    return arrays


def test_imagefolder_reads_npy_and_tif_arrays_with_any_channel_count_in_their_dtype(tmp_path):
    arrays = multispectral_tree(tmp_path / "tiles")
    data = load_imagefolder(str(tmp_path / "tiles"), image_size=8, in_channels=5, val_fraction=0.25)
    assert data.class_names == ["field", "water"]
    assert data.train.images.dtype == torch.uint16 and data.train.images.shape[1:] == (5, 8, 8)
    assert len(data.train) + len(data.val) == 12 and len(data.test) == 4
    stored = {tuple(image.flatten()[:6].tolist()) for image in torch.cat([data.train.images, data.val.images])}
    for rel, chw in arrays.items():  # every file, .npy (C, H, W) or .tif (H, W, C), arrives as (C, H, W)
        if rel.startswith("train"):
            assert tuple(torch.from_numpy(chw.astype(np.int64)).flatten()[:6].tolist()) in stored
    module = DataModule(data, image_size=8, in_channels=5, num_classes=2, normalization="auto")
    batch = module.to_float(data.train.images[:2])
    assert batch.dtype == torch.float32 and 0 <= batch.min() and batch.max() <= 1  # uint16 / 65535


def test_arrays_are_resized_to_image_size_and_floats_kept(tmp_path):
    root = tmp_path / "floats"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            for i in range(3):
                write(root / split / cls / f"{i}.npy", np.full((12, 12, 4), 0.25 * (i + 1), dtype=np.float64))
    data = load_imagefolder(str(root), image_size=6, in_channels=4, val_fraction=0.34)
    assert data.train.images.dtype == torch.float32 and data.train.images.shape[1:] == (4, 6, 6)
    values = sorted({round(v, 4) for v in data.test.images.flatten().tolist()})
    assert values == [0.25, 0.5, 0.75]  # resized constants stay what they were; floats are not rescaled
    assert torch.equal(DataModule(data, 6, 4, 2, normalization="auto").to_float(data.test.images), data.test.images)


def test_channel_axis_detected_or_declared(tmp_path):
    square = write(tmp_path / "a.npy", np.zeros((3, 8, 3), dtype=np.uint8))  # both ends could be channels
    with pytest.raises(ValueError, match="both ends matches data.in_channels=3; .*data.channels_last=true"):
        read_array(square, in_channels=3, channels_last=None)
    assert read_array(square, in_channels=3, channels_last=True).shape == (3, 3, 8)
    assert read_array(square, in_channels=3, channels_last=False).shape == (3, 8, 3)
    wrong = write(tmp_path / "b.npy", np.zeros((4, 8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="neither end matches data.in_channels=3"):
        read_array(wrong, in_channels=3, channels_last=None)
    assert read_array(write(tmp_path / "c.tif", np.ones((8, 8), dtype=np.uint16)), 1, None).shape == (1, 8, 8)


def test_a_float_file_among_integer_images_fails_with_one_line_naming_it(tmp_path):
    # integers of other widths are scaled into the common dtype (tests/test_reliability.py); a float array
    # among integer images is not squeezed into integers
    root = tmp_path / "mixed"
    for split in ("train", "test"):
        write(root / split / "a" / "0.npy", np.zeros((1, 8, 8), dtype=np.float32))
        for i in (1, 2, 3):
            write(root / split / "a" / f"{i}.png", np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"0.npy holds float32 values but most files hold uint8"):
        load_imagefolder(str(root), image_size=8, in_channels=1)


def test_imagefolder_cache_is_reused_until_a_file_changes(tmp_path, monkeypatch):
    root = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            for i in range(3):
                write(root / split / cls / f"{i}.png", rng.integers(0, 256, (10, 10, 3), dtype=np.uint8))
    decodes = []
    real_read_image = imagefolder.read_image
    monkeypatch.setattr(imagefolder, "read_image", lambda *a, **kw: decodes.append(a[0]) or real_read_image(*a, **kw))
    cache = tmp_path / "cache"

    first = load_imagefolder(str(root), image_size=8, cache_dir=str(cache), val_fraction=0.34)
    assert len(decodes) == 12 and len(list(cache.glob("imagefolder-photos-*.pt"))) == 1
    again = load_imagefolder(str(root), image_size=8, cache_dir=str(cache), val_fraction=0.34)
    assert len(decodes) == 12  # read from the cache, no decoding
    assert torch.equal(again.train.images, first.train.images) and torch.equal(again.test.images, first.test.images)

    changed = root / "test" / "dog" / "2.png"
    write(changed, np.zeros((10, 10, 3), dtype=np.uint8))
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    rebuilt = load_imagefolder(str(root), image_size=8, cache_dir=str(cache), val_fraction=0.34)
    assert len(decodes) == 24  # the change invalidates the cache: everything decoded again
    assert rebuilt.test.images[-1].sum() == 0 and not torch.equal(rebuilt.test.images, first.test.images)
    assert len(list(cache.glob("imagefolder-photos-*.pt"))) == 2


def test_imagefolder_missing_split_folder_fails_clearly(tmp_path):
    write(tmp_path / "only_train" / "train" / "a" / "0.png", np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(FileNotFoundError, match="must hold train/<class>/ and test/<class>/"):
        load_imagefolder(str(tmp_path / "only_train"), image_size=8)


# ---- data=csv ---------------------------------------------------------------------------------------------


def write_manifest(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def csv_dataset(root, n=20, split_column=True):
    """tiles/<i>.npy (4 bands, value i everywhere), a single label, multi-label columns, metadata."""
    rows = []
    for i in range(n):
        write(root / "tiles" / f"{i}.npy", np.full((4, 8, 8), i, dtype=np.uint8))
        split = "test" if i % 5 == 0 else ("val" if i % 5 == 1 else "train")
        row = [f"tiles/{i}.npy", "riot" if i % 2 else "calm", i % 2, int(i % 3 == 0), 0.5 * i, f"note {i}"]
        rows.append(row + [split] if split_column else row)
    header = ["image", "label", "riot", "crowd", "population", "notes"] + (["split"] if split_column else [])
    return write_manifest(root / "manifest.csv", header, rows)


def test_csv_single_label_with_split_column_keeps_metadata_with_each_row(tmp_path):
    manifest = csv_dataset(tmp_path)
    data = load_csv(str(manifest), image_size=8, in_channels=4)
    assert data.class_names == ["calm", "riot"]
    assert (len(data.train), len(data.val), len(data.test)) == (12, 4, 4)
    for split in (data.train, data.val, data.test):
        row = split.images[:, 0, 0, 0].long()  # the file of row i holds the value i
        assert torch.equal(split.labels, row % 2)  # riot on odd rows
        # metadata `auto`: the numeric columns the labels do not use, in order (riot, crowd, population)
        assert torch.equal(split.metadata, torch.stack([row % 2, (row % 3 == 0).long(), row], 1).float()
                           * torch.tensor([1.0, 1.0, 0.5]))
    assert set(data.test.images[:, 0, 0, 0].tolist()) == {0, 5, 10, 15}


def test_csv_multi_label_and_a_seeded_split(tmp_path):
    manifest = csv_dataset(tmp_path, n=40, split_column=False)
    kwargs = {"image_size": 8, "in_channels": 4, "label_columns": ["riot", "crowd"],
              "metadata_columns": ["population"], "test_fraction": 0.25, "val_fraction": 0.2, "split_seed": 3}
    data = load_csv(str(manifest), **kwargs)
    assert data.class_names == ["riot", "crowd"]
    assert data.train.labels.dtype == torch.float32 and data.train.labels.shape[1] == 2
    for split in (data.train, data.val, data.test):
        row = split.images[:, 0, 0, 0].long()
        assert torch.equal(split.labels, torch.stack([row % 2, (row % 3 == 0).long()], 1).float())
        assert torch.equal(split.metadata[:, 0], 0.5 * row)
    assert len(data.train) + len(data.val) + len(data.test) == 40 and 8 <= len(data.test) <= 12
    again = load_csv(str(manifest), **kwargs)
    assert torch.equal(again.test.images, data.test.images)  # the split depends on the seed only


@pytest.mark.parametrize("change,message", [
    (lambda rows: rows, "data.source.label_columns: .* has no column 'nope'"),
    (lambda rows: [rows[0][:6] + ["holdout"]] + rows[1:], "row 2 has split='holdout': use one of train, val, test"),
    (lambda rows: [["tiles/missing.npy"] + rows[0][1:]] + rows[1:], "row 2 names .*missing.npy, which does not exist"),
])
def test_csv_errors_name_the_row_or_key(tmp_path, change, message):
    manifest = csv_dataset(tmp_path)
    with open(manifest) as f:
        header, *rows = list(csv.reader(f))
    write_manifest(manifest, header, change(rows))
    label_columns = ["nope"] if "nope" in message else ["label"]
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_csv(str(manifest), image_size=8, in_channels=4, label_columns=label_columns)


def test_csv_root_must_be_the_manifest_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="point data.root at the manifest CSV"):
        load_csv(str(tmp_path), image_size=8)


# ---- CIFAR-10 offline -------------------------------------------------------------------------------------


def fake_cifar10(root, per_batch=4):
    """cifar-10-batches-py/ in the real format: pickled dicts of (N, 3072) uint8 rows (R, G, B planes)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for b, name in enumerate(["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                              "test_batch"]):
        labels = [(b + i) % 10 for i in range(per_batch)]
        # image i: red plane = its label, green = 100 + batch, blue = 200
        planes = [np.full((per_batch, 1024), 0, dtype=np.uint8) for _ in range(3)]
        planes[0][:] = np.array(labels, dtype=np.uint8)[:, None]
        planes[1][:] = 100 + b
        planes[2][:] = 200
        with open(folder / name, "wb") as f:
            pickle.dump({"data": np.concatenate(planes, axis=1), "labels": labels, "batch_label": name}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)


def test_cifar10_loads_a_local_copy_without_network(tmp_path, monkeypatch):
    fake_cifar10(tmp_path / "cifar10")
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)  # our fake files lack the md5s
    data = load_cifar10(str(tmp_path / "cifar10"), download=False, val_fraction=0.2)
    assert data.class_names == [f"class{i}" for i in range(10)]
    assert len(data.train) + len(data.val) == 20 and len(data.test) == 4
    assert data.train.images.dtype == torch.uint8 and data.train.images.shape[1:] == (3, 32, 32)
    for split in (data.train, data.val, data.test):  # channel planes land on the channel axis
        assert torch.equal(split.images[:, 0, 5, 7].long(), split.labels)
        assert (split.images[:, 2] == 200).all()
    assert (data.test.images[:, 1] == 105).all()


def test_cifar10_missing_and_offline_fails_with_one_line(tmp_path):
    with pytest.raises(FileNotFoundError) as failure:
        load_cifar10(str(tmp_path / "nowhere"), download=False)
    message = str(failure.value)
    assert "\n" not in message and "data.source.root=" in message and "data=imagefolder data.root=DIR" in message
