"""Tabular metadata as a model input (model/metadata): the encoder standardizes with stored training statistics,
embeds categories and masks missing cells; each fusion does what it says; the data keeps, serves and counts it."""

from __future__ import annotations

import csv
from functools import partial

import numpy as np
import pytest
import torch
from conftest import fit_in_process

from vitsweep.data.csv import load_csv
from vitsweep.data.datamodule import DataModule
from vitsweep.data.inputs import Inputs
from vitsweep.data.synthetic_series import load_synthetic_series
from vitsweep.model.metadata import MetadataInput, reads_metadata
from vitsweep.model.vit import VisionTransformer

SHAPE = {"image_size": 16, "patch_size": 4, "in_channels": 3, "num_classes": 3, "embed_dim": 32, "depth": 2,
         "num_heads": 2, "mlp_dim": 64}
SPEC = {"numeric": ["events", "population"], "mean": [500.0, 3000.0], "std": [100.0, 1000.0],
        "categorical": {"region": 4}}


def metadata_model(fusion: str, spec=SPEC, **options) -> VisionTransformer:
    return VisionTransformer(**{**SHAPE, **options}, metadata=partial(MetadataInput, fusion=fusion),
                             metadata_spec=spec).eval()


def batch(n=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 16, 16, generator=generator)
    numeric = torch.stack([500 + 100 * torch.randn(n, generator=generator),
                           3000 + 1000 * torch.randn(n, generator=generator)], 1)
    return Inputs(images, numeric, torch.randint(4, (n, 1), generator=generator))


@pytest.mark.parametrize("fusion", ["film", "late"])
def test_film_and_late_start_as_the_image_only_model(fusion):
    torch.manual_seed(0)
    image_model = VisionTransformer(**SHAPE).eval()
    model = metadata_model(fusion)
    missing, unexpected = model.load_state_dict(image_model.state_dict(), strict=False)
    assert not unexpected and all(name.startswith("metadata.") for name in missing)
    inputs = batch()
    expected = image_model(inputs.images)
    assert torch.equal(model(inputs), expected)  # step 0: the metadata changes nothing yet ...
    other = Inputs(inputs.images, inputs.numeric * 3, (inputs.categories + 1) % 4)
    assert torch.equal(model(other), expected)  # ... whatever it holds


def test_each_fusion_makes_the_output_depend_on_the_metadata_once_trained_or_at_once():
    torch.manual_seed(0)
    inputs = batch()
    shuffled = Inputs(inputs.images, inputs.numeric.roll(1, 0), inputs.categories.roll(1, 0))
    token = metadata_model("token")
    assert not torch.allclose(token(inputs), token(shuffled))  # a token is read from the start
    for fusion in ("film", "late"):
        model = metadata_model(fusion)
        for parameter in model.metadata.parameters():  # as if trained: off the identity init
            torch.nn.init.normal_(parameter, std=0.1)
        assert not torch.allclose(model(inputs), model(shuffled))
    none = VisionTransformer(**SHAPE).eval()
    assert torch.equal(none(inputs), none(shuffled)) and torch.equal(none(inputs), none(inputs.images))


@pytest.mark.slow
def test_a_label_in_the_metadata_only_is_learned_by_each_fusion_and_not_without():
    """signal=metadata: the images are noise and a blob at a random place, the label is z(events) + region > 0."""
    source = load_synthetic_series(image_size=8, frames=1, signal="metadata", num_train=1024, num_val=32,
                                   num_test=256)
    data = DataModule(source, image_size=8, in_channels=3, num_classes=2, batch_size=32, eval_batch_size=256)
    shape = {"image_size": 8, "patch_size": 4, "in_channels": 3, "num_classes": 2, "embed_dim": 16, "depth": 1,
             "num_heads": 2, "mlp_dim": 32}
    for fusion in ("none", "token", "film", "late"):
        torch.manual_seed(0)
        model = VisionTransformer(**shape, metadata=partial(MetadataInput, fusion=fusion),
                                  metadata_spec=data.metadata_spec())
        accuracy = fit_in_process(model, data, epochs=12)
        if fusion == "none":
            assert 0.35 < accuracy < 0.65, accuracy  # chance: the images say nothing
            continue
        assert accuracy > 0.9, (fusion, accuracy)
        inputs, _ = next(iter(data.eval_batches("test")))
        inputs = data.normalize(inputs)
        shuffled = Inputs(inputs.images, inputs.numeric.roll(1, 0), inputs.categories.roll(1, 0))
        with torch.no_grad():
            changed = (model(inputs).argmax(1) != model(shuffled).argmax(1)).float().mean()
        assert changed > 0.25, (fusion, changed)  # about half: each sample gets its neighbour's label


def test_token_is_one_more_prefix_token_without_a_position():
    model = metadata_model("token")
    plain = VisionTransformer(**SHAPE)
    assert model.num_prefix_tokens == 2 and model.pos_embed.weight.shape == plain.pos_embed.weight.shape
    images, clip = model.read_inputs(batch())
    tokens = model.forward_features(images, clip=clip)
    assert tokens.shape == (6, 2 + 16, 32)
    mean_pooled = metadata_model("token", pooling="mean")
    assert mean_pooled.num_prefix_tokens == 1 and mean_pooled.cls_token is None


def test_numeric_columns_are_standardized_with_the_stored_training_statistics():
    torch.manual_seed(0)
    model = metadata_model("late")
    inputs = batch()
    vector = model.metadata.encode(inputs)
    # the same values in other units (x 10, + 7) with the statistics in those units: the same vector
    rescaled_spec = {**SPEC, "mean": [10 * m + 7 for m in SPEC["mean"]], "std": [10 * s for s in SPEC["std"]]}
    rescaled = metadata_model("late", spec=rescaled_spec)
    rescaled.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith(("mean", "std"))},
                             strict=False)
    other_units = Inputs(inputs.images, inputs.numeric * 10 + 7, inputs.categories)
    torch.testing.assert_close(rescaled.metadata.encode(other_units), vector)
    # the statistics are buffers: they travel in the checkpoint's weights, and a restore brings them back
    state = model.state_dict()
    assert torch.equal(state["metadata.encoder.mean"], torch.tensor(SPEC["mean"]))
    restored = metadata_model("late", spec={**SPEC, "mean": [0.0, 0.0], "std": [1.0, 1.0]})
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.metadata.encode(inputs), vector)


def test_missing_cells_are_masked_never_nan_in_the_forward_pass():
    torch.manual_seed(0)
    inputs = batch()
    inputs.numeric[0, 0] = float("nan")
    inputs.numeric[1] = float("nan")
    inputs.categories[2, 0] = -1
    inputs.categories[3, 0] = 99  # a value the model never saw: missing too
    for fusion in ("token", "film", "late"):
        model = metadata_model(fusion)
        outputs = []

        def check(module, args, output, outputs=outputs):
            if torch.is_tensor(output):
                outputs.append(bool(torch.isfinite(output).all()))

        hooks = [module.register_forward_hook(check) for module in model.modules()]
        out = model(inputs)
        for hook in hooks:
            hook.remove()
        assert torch.isfinite(out).all() and outputs and all(outputs), fusion
        out.sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    encoder = metadata_model("late").metadata.encoder
    missing_row = encoder(torch.full((1, 2), float("nan")), torch.tensor([[-1]]))
    unseen_row = encoder(torch.full((1, 2), float("nan")), torch.tensor([[99]]))
    torch.testing.assert_close(missing_row, unseen_row)  # the "missing" vectors of every column


def test_metadata_options_fail_in_one_line():
    with pytest.raises(ValueError, match="model/metadata=token reads metadata columns, but the data has none"):
        metadata_model("token", spec=None)
    with pytest.raises(ValueError, match="fusion='concat' is not one of: none, token, film, late"):
        metadata_model("concat")
    model = metadata_model("film")
    with pytest.raises(ValueError, match="but the batch has no metadata"):
        model(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="the batch has 3 numeric metadata columns, the model was built for 2"):
        model(Inputs(torch.randn(2, 3, 16, 16), torch.zeros(2, 3), torch.zeros(2, 1, dtype=torch.long)))
    assert reads_metadata({"metadata": {"fusion": "late"}}) and not reads_metadata({"metadata": {"fusion": "none"}})
    assert not reads_metadata({})


def test_datamodule_gives_the_training_statistics_and_counts_missing_cells():
    source = load_synthetic_series(frames=1, signal="metadata", num_train=200, num_val=40, num_test=40,
                                   metadata_missing=0.25)
    data = DataModule(source, image_size=16, in_channels=3, num_classes=2, batch_size=16)
    spec = data.metadata_spec()
    train = source.train.metadata.double()
    present = ~train.isnan()
    assert spec["numeric"] == ["events", "population"] and spec["categorical"] == {"region": 4}
    assert spec["mean"][0] == pytest.approx(train[present[:, 0], 0].mean().item())
    assert spec["std"][0] == pytest.approx(train[present[:, 0], 0].std().item())
    summary = data.input_summary()["metadata"]
    assert summary["columns"] == ["events", "population", "region"]
    assert summary["missing"]["train"]["events"] == int((~present[:, 0]).sum())
    assert summary["missing"]["test"]["region"] == int((source.test.categories < 0).sum())
    assert summary["missing_cells"] == sum(int(s.metadata.isnan().sum() + (s.categories < 0).sum())
                                           for s in (source.train, source.val, source.test)) > 0
    inputs, labels = next(iter(data.train_batches(0, 0)))
    index = data.epoch_order(0, 0)[:16]
    assert torch.equal(inputs.numeric.nan_to_num(-1), source.train.metadata[index].nan_to_num(-1))
    assert torch.equal(labels, source.train.labels[index])


# ---------------------------------------------------------------------------------------------------- csv


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def series_csv(root, n=10, frames=3, four_d=False):
    """Row i: frames whose pixels hold 10 * i + t, dates 30 days apart, an event count, a region; some cells empty."""
    (root / "frames").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        if four_d:
            np.save(root / "frames" / f"{i}.npy", np.stack([np.full((2, 4, 4), 10 * i + t, np.uint8)
                                                            for t in range(frames)]))
            cell = f"frames/{i}.npy"
        else:
            for t in range(frames):
                np.save(root / "frames" / f"{i}_{t}.npy", np.full((2, 4, 4), 10 * i + t, np.uint8))
            cell = ";".join(f"frames/{i}_{t}.npy" for t in range(frames))
        dates = "" if i == 3 else ";".join(f"2021-0{1 + t}-01" for t in range(frames))
        split = "test" if i % 5 == 0 else "train"
        rows.append([cell, i % 2, dates, "" if i == 2 else 100 + i, ["north", "south", ""][i % 3], 0.5 * i, split])
    return write_csv(root / "series.csv", ["image", "label", "dates", "events", "region", "score", "split"], rows)


@pytest.mark.parametrize("four_d", [False, True], ids=["paths_joined", "4d_arrays"])
def test_csv_time_series_with_dates_categories_and_empty_cells(tmp_path, four_d):
    manifest = series_csv(tmp_path, four_d=four_d)
    data = load_csv(str(manifest), image_size=4, in_channels=2, categorical_columns=["region"],
                    cache_dir=str(tmp_path / "cache"))
    train = data.train
    assert train.images.shape[1:] == (3, 2, 4, 4) and train.frames == 3
    row = train.images[:, 0, 0, 0, 0].long() // 10  # which CSV row each sample is
    assert torch.equal(train.images[:, :, 0, 0, 0].long(), 10 * row[:, None] + torch.arange(3))  # frames in order
    assert data.metadata_columns == ["events", "score"] and data.category_values == {"region": ["north", "south"]}
    events = train.metadata[:, 0]
    assert torch.equal(events.isnan(), row == 2) and torch.equal(events[row != 2], 100.0 + row[row != 2])
    assert torch.equal(train.categories[:, 0], torch.tensor([[0, 1, -1][i % 3] for i in row.tolist()]))
    jan_2021 = 18628.0  # 2021-01-01 in days since 1970-01-01
    known = row != 3
    assert torch.equal(train.dates[known], torch.tensor([jan_2021, jan_2021 + 31, jan_2021 + 59]).expand(
        int(known.sum()), 3))
    assert train.dates[~known].isnan().all()


@pytest.mark.parametrize("change,message", [
    (lambda rows: [[rows[0][0].rsplit(";", 1)[0], *rows[0][1:]], *rows[1:]],
     "row 2 has 2 frame.* but row 3 has 3|row 3 has 3 frame.* but row 2 has 2"),
    (lambda rows: [[rows[0][0], rows[0][1], "2021-01-01;2021-02-01", *rows[0][3:]], *rows[1:]],
     "row 2 has 2 date.* for 3 frame"),
    (lambda rows: [[rows[0][0], rows[0][1], "2021-01-01;March;2021-03-01", *rows[0][3:]], *rows[1:]],
     "row 2 has dates=.*: dates are ISO"),
    (lambda rows: [[*rows[0][:3], "many", *rows[0][4:]], *rows[1:]], None),
])
def test_csv_time_series_errors_name_the_row(tmp_path, change, message):
    manifest = series_csv(tmp_path)
    with open(manifest) as f:
        header, *rows = list(csv.reader(f))
    write_csv(manifest, header, change(rows))
    if message is None:  # a text cell in a numeric column: `auto` leaves the column out; named, it is an error
        assert "events" not in load_csv(str(manifest), image_size=4, in_channels=2).metadata_columns
        with pytest.raises(ValueError, match="row 2 has events='many': metadata columns hold numbers"):
            load_csv(str(manifest), image_size=4, in_channels=2, metadata_columns=["events"])
        return
    with pytest.raises(ValueError, match=message):
        load_csv(str(manifest), image_size=4, in_channels=2)
