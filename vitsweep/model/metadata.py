"""Tabular metadata as a model input (the model/metadata config group): event counts, census figures, a
region, a sensor: the columns the data keeps per sample (data=csv: numeric `metadata_columns` and
`categorical_columns`; vitsweep.data.inputs).

The encoder turns a sample's metadata into one vector m (D,), as FT-Transformer's feature tokenizer:
numeric column j is standardized with the training split's mean and std (buffers, so they travel in the
checkpoint's weights and eval mode uses the training statistics), then embedded as z_j * w_j + b_j; a
categorical column through an embedding table of its values; a missing cell (NaN, or -1 for a category)
as a learned "missing" vector of its column, so no NaN ever enters the forward pass. The column vectors
are summed and passed through an MLP, then normalized. The fusion (`fusion`) decides where m enters:

    none    nowhere: the model reads the images only (the image baseline), whatever columns the data has
    token   one extra prefix token, right after cls (every token can attend to it; position-free)
    film    FiLM (Perez et al. 2018) after every block: tokens * (1 + gamma_i(m)) + beta_i(m), with gamma_i and
            beta_i linear maps initialised at zero, so the step-0 model is the image-only model
    late    concatenated before the head: the pooled vector becomes W [pooled; m] + b, W initialised as
            [I 0], so a linear head reads a linear function of the concatenation

Time series: every frame of a sample carries its sample's m (token, film); late fusion acts on the sample's
vector after the frames are pooled.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from vitsweep.data.inputs import Inputs
from vitsweep.model.hooks import TrunkOption, TrunkPass

FUSIONS = ("none", "token", "film", "late")


def reads_metadata(model_cfg: Mapping) -> bool:
    """Whether a model config reads metadata columns (so the data, which knows them, is built first)."""
    metadata = model_cfg.get("metadata") or {}
    return metadata.get("fusion", "none") != "none"


class MetadataEncoder(nn.Module):
    """Numeric (B, M) values (NaN: missing) and categories (B, K) (-1: missing) -> m (B, D)."""

    def __init__(self, dim: int, spec: Mapping):
        super().__init__()
        numeric, categorical = list(spec.get("numeric") or []), dict(spec.get("categorical") or {})
        self.numeric_names, self.category_names = numeric, list(categorical)
        count = len(numeric)
        mean, std = list(spec.get("mean") or [0.0] * count), list(spec.get("std") or [1.0] * count)
        if len(mean) != count or len(std) != count:
            raise ValueError(f"the metadata spec has {count} numeric columns but {len(mean)} means and {len(std)} "
                             f"stds: DataModule.metadata_spec() gives them together")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))  # the training split's, saved
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))
        self.value_weight = nn.Parameter(torch.zeros(count, dim))  # (M, D): column j's direction
        self.value_bias = nn.Parameter(torch.zeros(count, dim))
        self.missing = nn.Parameter(torch.zeros(count, dim))  # column j's "missing" vector
        for parameter in (self.value_weight, self.value_bias, self.missing):
            nn.init.trunc_normal_(parameter, std=0.02)
        # row `size` of each table: a missing (or, in other data, unseen) value
        self.categories = nn.ModuleList(nn.Embedding(size + 1, dim) for size in categorical.values())
        # the sum of column vectors still carries each value's size (a norm first would keep only its sign)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim), nn.LayerNorm(dim, eps=1e-6))

    def forward(self, numeric: torch.Tensor | None, categories: torch.Tensor | None) -> torch.Tensor:
        total = None
        if self.numeric_names:
            present = ~numeric.isnan()  # (B, M)
            z = (torch.where(present, numeric.float(), self.mean) - self.mean) / self.std  # 0 where missing
            columns = z[..., None] * self.value_weight + self.value_bias  # (B, M, D)
            total = torch.where(present[..., None], columns, self.missing).sum(dim=1)  # (B, D)
        for k, table in enumerate(self.categories):
            codes = categories[:, k]
            size = table.num_embeddings - 1
            vector = table(torch.where((codes >= 0) & (codes < size), codes, size))  # (B, D)
            total = vector if total is None else total + vector
        return self.mlp(total)


class MetadataInput(TrunkOption):
    """The model/metadata option `fusion` (see the module docstring), built by the ViT with its width, its
    depth and the data's metadata `spec` (DataModule.metadata_spec()). Its hooks (hooks.py): `prefix_tokens`
    (token), `after_block` (film), `pool` (late); the trunk encodes the batch's metadata (`encode`) into its
    Clip when it reads the inputs."""

    def __init__(self, fusion: str = "none", dim: int = 0, depth: int = 0, spec: Mapping | None = None):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"model.metadata.fusion={fusion!r} is not one of: {', '.join(FUSIONS)}")
        self.fusion = self.name = fusion
        self.num_tokens = 1 if fusion == "token" else 0  # prefix tokens it adds after cls (and the prompts)
        if fusion == "none":
            return
        if not spec or not (spec.get("numeric") or spec.get("categorical")):
            raise ValueError(f"model/metadata={fusion} reads metadata columns, but the data has none: data=csv keeps "
                             f"numeric columns (data.source.metadata_columns) and categorical ones "
                             f"(data.source.categorical_columns); or use model/metadata=none")
        self.encoder = MetadataEncoder(dim, spec)
        if fusion == "film":
            self.film = nn.ModuleList(nn.Linear(dim, 2 * dim) for _ in range(depth))  # -> (gamma, beta) per block
        elif fusion == "late":
            self.late = nn.Linear(2 * dim, dim)

    def init_weights(self) -> None:
        """After the ViT's default init: FiLM at zero (identity), late fusion at [I 0] (the pooled vector)."""
        if self.fusion == "film":
            for layer in self.film:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
        elif self.fusion == "late":
            dim = self.late.out_features
            with torch.no_grad():
                self.late.weight.copy_(torch.cat([torch.eye(dim), torch.zeros(dim, dim)], dim=1))
                self.late.bias.zero_()

    def encode(self, inputs: Inputs) -> torch.Tensor | None:
        """The metadata vector m (B, D) of a batch, or None when the model reads no metadata."""
        if self.fusion == "none":
            return None
        encoder = self.encoder
        numeric, categories = inputs.numeric, inputs.categories
        if (encoder.numeric_names and numeric is None) or (encoder.category_names and categories is None):
            raise ValueError(f"model/metadata={self.fusion} was built for the metadata columns "
                             f"{encoder.numeric_names + encoder.category_names}, but the batch has no metadata: "
                             f"feed the model DataModule batches (vitsweep.data.inputs.Inputs)")
        if numeric is not None and encoder.numeric_names and numeric.shape[1] != len(encoder.numeric_names):
            raise ValueError(f"the batch has {numeric.shape[1]} numeric metadata columns, the model was built for "
                             f"{len(encoder.numeric_names)} ({', '.join(encoder.numeric_names)})")
        return encoder(numeric, categories)

    def prefix_tokens(self, batch: int, run: TrunkPass) -> torch.Tensor | None:
        """token: the metadata token of each frame, (B * T, 1, D), inserted after cls (and the prompts)."""
        if self.fusion != "token":
            return None
        return run.clip.per_frame(run.clip.metadata)[:, None, :]  # (B * T, 1, D)

    def after_block(self, layer: int, tokens: torch.Tensor, run: TrunkPass) -> torch.Tensor:
        """film: block `layer`'s output tokens (B * T, N, D), scaled and shifted by the sample's metadata."""
        if self.fusion != "film":
            return tokens
        gamma, beta = self.film[layer](run.clip.per_frame(run.clip.metadata)).chunk(2, dim=-1)  # (B * T, D) each
        return tokens * (1 + gamma[:, None, :]) + beta[:, None, :]

    def pool(self, pooled: torch.Tensor, run: TrunkPass) -> torch.Tensor:
        """late: the sample's vector (B, D) -> W [pooled; m] + b (B, D)."""
        if self.fusion != "late":
            return pooled
        return self.late(torch.cat([pooled, run.clip.metadata.to(pooled.dtype)], dim=-1))
