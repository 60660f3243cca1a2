"""Normalization layers over tokens (B, N, C). LayerNorm and RMSNorm come from torch as they are;
BatchNorm needs the channel axis second, and normalizes each channel over batch *and* tokens."""

from torch import nn


class TokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over the channels of a (B, N, C) token tensor (or a (B, C) pooled one)."""

    def forward(self, x):
        if x.dim() == 2:
            return super().forward(x)
        return super().forward(x.transpose(1, 2)).transpose(1, 2)  # (B, C, N) -> (B, N, C)
