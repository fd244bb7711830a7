"""A Llama-style decoder stack with an explicit, preallocated KV cache (in the manner of gpt-fast).

Parameter names match transformers' LlamaModel (`layers.N.self_attn.q_proj`, ...), so the official
`backbone.model.*` / `decoder.model.*` weights load as they are. The arithmetic follows transformers'
Llama float32 path step by step (RMSNorm in fp32, rotate-half RoPE, SDPA) so greedy outputs match upstream.

Batching: every call works on a batch of rows, each with its own cache row. A row may feed several new
positions; `write_index` says where each lands in that row's cache and `-1` marks padding, which is written
to a scratch column that nobody reads. That lets one forward serve rows that need 0, 1, 3 or a whole prompt
of new positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from model.chroma.config import SpeechTransformerConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = to_dtype(x, torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * to_dtype(x, dtype)


def to_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x.to(dtype), without the call where it is a no-op: at the engine's small sizes a step costs its op dispatches,
    and a no-op cast costs one like any other op."""
    return x if x.dtype == dtype else x.to(dtype)


class RotaryEmbedding:
    """cos/sin tables for integer positions. A plain object (not a module): it owns no weights, and keeping
    it out of the state dict lets the stack be built on the meta device and loaded with assign=True."""

    def __init__(self, config: SpeechTransformerConfig):
        rope = dict(config.rope_parameters)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type == "default":
            dim = config.head_dim
            self.inv_freq = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float, device="cpu") / dim))
            self.scaling = 1.0
        else:
            # Llama-3 and other scaled variants: reuse transformers' exact formulas.
            from transformers import LlamaConfig
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            hf = LlamaConfig(**config.model_dump(exclude={"audio_embedding_dim", "audio_num_codebooks"}))
            self.inv_freq, self.scaling = ROPE_INIT_FUNCTIONS[rope_type](hf, torch.device("cpu"))
        self._by_device: dict[torch.device, torch.Tensor] = {}

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """[...] integer positions -> (cos, sin) [..., head_dim], transformers' tables."""
        inv_freq = self._by_device.get(positions.device)
        if inv_freq is None:  # a host-to-device copy: the first (warm-up) forward on a device makes it, never a capture
            inv_freq = self._by_device[positions.device] = self.inv_freq.to(positions.device, torch.float)
        freqs = positions[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)

    def for_attention(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, L] positions -> (cos, signed sin) [B, L, 1, head_dim], for `rotate` over [B, L, heads, head_dim]: the
        sin's first half negated."""
        cos, sin = self(positions, dtype)
        half = sin.shape[-1] // 2
        return cos[:, :, None], torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)[:, :, None]


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """transformers' x * cos + rotate_half(x) * sin in four ops instead of seven: rotate_half(x) = cat(-x2, x1) is
    roll(x) = cat(x2, x1) with x2's sign moved onto the sin, and a sign flip is exact, so the result is bitwise
    the same."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


@dataclass
class KVCache:
    """Per-layer key/value rows [rows, layers, kv_heads, capacity + 1, head_dim]; the last column is the
    scratch column for padded inputs. `visible[r, j]` says whether row r's later positions may attend to j."""

    keys: torch.Tensor
    values: torch.Tensor
    visible: torch.Tensor

    @classmethod
    def allocate(cls, config: SpeechTransformerConfig, rows: int, capacity: int, device, dtype) -> "KVCache":
        shape = (rows, config.num_hidden_layers, config.num_key_value_heads, capacity + 1, config.head_dim)
        return cls(
            keys=torch.zeros(shape, device=device, dtype=dtype),
            values=torch.zeros(shape, device=device, dtype=dtype),
            visible=torch.zeros(rows, capacity + 1, device=device, dtype=torch.bool),
        )

    @property
    def capacity(self) -> int:
        return self.keys.shape[3] - 1

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes + self.visible.nbytes


@dataclass
class StepInputs:
    """Addressing for one forward over consecutive `rows` of a cache.

    rows:         [B] cache rows the batch rows use, consecutive: attention reads them as a view of the cache
    write_index:  [B, L] cache column of each new position, -1 for padding
    positions:    [B, L] rotary position of each new position
    attend:       [B, L] whether later positions may attend to this one (upstream's attention_mask)
    kv_len:       cache columns attention reads, at least 1 + the largest write index; known on the host so
                  the forward needs no device sync
    row_range:    (first, last + 1) of `rows`, on the host
    """

    rows: torch.Tensor
    write_index: torch.Tensor
    positions: torch.Tensor
    attend: torch.Tensor
    kv_len: int
    row_range: tuple[int, int]

    @classmethod
    def contiguous(cls, rows: list[int], starts: list[int], lengths: list[int], device, attend=None, positions=None) -> "StepInputs":
        """Row i writes `lengths[i]` new positions from cache column `starts[i]`; rotary positions equal the
        cache columns unless given. Shorter rows are padded to the longest."""
        if rows != list(range(rows[0], rows[0] + len(rows))):
            raise ValueError(f"a step's cache rows must be consecutive, got {rows}")
        write_index, real = _write_index(torch.tensor(starts), torch.tensor(lengths), max(lengths))
        return cls(
            rows=torch.tensor(rows, device=device),
            write_index=write_index.to(device),
            positions=(write_index.clamp(min=0) if positions is None else positions).to(device),
            attend=(real if attend is None else attend & real).to(device),
            kv_len=max(s + n for s, n in zip(starts, lengths)),
            row_range=(rows[0], rows[-1] + 1),
        )

    @classmethod
    def first_rows(cls, starts: torch.Tensor, lengths: torch.Tensor, width: int, kv_len: int, attend=None) -> "StepInputs":
        """Addressing built on the device, with no host data: batch row i is cache row i, writes `lengths[i]`
        (0..width) new positions from column `starts[i]`, and attention reads columns [0, kv_len) of rows
        [0, B). Static shapes for a given (B, width, kv_len): what a CUDA graph replays."""
        write_index, real = _write_index(starts, lengths, width)
        return cls(
            rows=torch.arange(starts.shape[0], device=starts.device),
            write_index=write_index,
            positions=write_index.clamp(min=0),
            attend=real if attend is None else attend & real,
            kv_len=kv_len,
            row_range=(0, starts.shape[0]),
        )

    def address(self, cache: KVCache, rotary: RotaryEmbedding, groups: int, dtype: torch.dtype) -> Addressing:
        """Record which new positions later ones may attend to in `cache.visible`, and make what every layer of
        this forward reads (`Addressing`). `groups`: query heads per kv head."""
        rows = self.rows[:, None]
        columns = torch.where(self.write_index < 0, cache.capacity, self.write_index)
        cache.visible[rows, columns] = self.attend & (self.write_index >= 0)
        cos, sin = rotary.for_attention(self.positions, dtype)
        return Addressing(rows, columns, self.attention_mask(cache, groups), cos, sin)

    def attention_mask(self, cache: KVCache, groups: int = 1) -> torch.Tensor:
        """[B, 1, groups * L, kv_len] bool: a query sees every visible column up to its own (causal); repeated for
        the `groups` query heads that attention folds into each kv head's query rows."""
        columns = torch.arange(self.kv_len, device=self.write_index.device)
        causal = columns[None, None, :] <= self.write_index[:, :, None]
        return (causal & cache.visible[self.rows, None, : self.kv_len]).repeat(1, groups, 1)[:, None]


@dataclass
class Addressing:
    """What every layer of one forward reads, made once per forward (`StepInputs.address`). A caller whose steps
    repeat exactly (the decoder's sub-steps, every frame) makes them once and passes them in: a step then costs no
    addressing ops at all."""

    rows: torch.Tensor  # [B, 1] cache rows, for the scatter of the new keys
    columns: torch.Tensor  # [B, L] cache column of each new position, padding on the scratch column
    mask: torch.Tensor  # [B, 1, groups * L, kv_len] bool
    cos: torch.Tensor  # [B, L, 1, head_dim]
    sin: torch.Tensor  # [B, L, 1, head_dim], signed for `rotate`


def _write_index(starts: torch.Tensor, lengths: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B] starts and lengths -> (cache column of each new position [B, width], -1 for padding; which are real)."""
    offsets = torch.arange(width, device=starts.device)
    real = offsets[None] < lengths[:, None]
    return torch.where(real, starts[:, None] + offsets[None], -1), real


class Attention(nn.Module):
    def __init__(self, config: SpeechTransformerConfig):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=config.attention_bias)

    def forward(self, x, layer: int, cache: KVCache, at: Addressing, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """x [B, L, hidden]; keys/values: this layer's cache rows [B, kv_heads, kv_len, head_dim], views that see the
        new keys written here."""
        batch, length, _ = x.shape
        # [B, L, heads, head_dim] as the projections make them: rotary and the cache scatter need no transpose. (A view
        # that only splits a dim is valid whatever the tensor's strides.)
        q = rotate(self.q_proj(x).view(batch, length, self.n_heads, self.head_dim), at.cos, at.sin)
        k = rotate(self.k_proj(x).view(batch, length, self.n_kv_heads, self.head_dim), at.cos, at.sin)
        v = self.v_proj(x).view(batch, length, self.n_kv_heads, self.head_dim)

        # Scatter the new keys into each row's cache (padding lands in the scratch column).
        cache.keys[at.rows, layer, :, at.columns] = to_dtype(k, cache.keys.dtype)
        cache.values[at.rows, layer, :, at.columns] = to_dtype(v, cache.values.dtype)

        # Grouped-query attention: the query heads of one kv head are folded into its query rows ([B, heads, L, d]
        # -> [B, kv_heads, groups * L, d]; the mask is repeated to match), so attention reads the cache once, never
        # a copy repeated per query head.
        q = q.transpose(1, 2).reshape(batch, self.n_kv_heads, -1, self.head_dim)
        out = F.scaled_dot_product_attention(q, to_dtype(keys, q.dtype), to_dtype(values, q.dtype), attn_mask=at.mask)
        # Back to [B, L, heads * d]: split the folded rows, permute, then reshape (a copy where needed). Never a view
        # that merges dims: the output's strides depend on the device and kernel (on CUDA it is not contiguous).
        out = out.view(batch, self.n_kv_heads, -1, length, self.head_dim).permute(0, 3, 1, 2, 4).reshape(batch, length, -1)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, config: SpeechTransformerConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: SpeechTransformerConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, layer: int, cache: KVCache, at: Addressing, keys: torch.Tensor, values: torch.Tensor):
        x = x + self.self_attn(self.input_layernorm(x), layer, cache, at, keys, values)
        return x + self.mlp(self.post_attention_layernorm(x))


class TransformerStack(nn.Module):
    """Llama decoder layers + final norm over input embeddings (the token embedding is the identity)."""

    def __init__(self, config: SpeechTransformerConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)

    def allocate_cache(self, rows: int, capacity: int | None = None) -> KVCache:
        weight = self.norm.weight
        return KVCache.allocate(
            self.config, rows, capacity or self.config.max_position_embeddings, weight.device, weight.dtype
        )

    def address(self, cache: KVCache, step: StepInputs, dtype: torch.dtype) -> Addressing:
        attention = self.layers[0].self_attn
        return step.address(cache, self.rotary, attention.n_heads // attention.n_kv_heads, dtype)

    def forward(self, x: torch.Tensor, cache: KVCache, step: StepInputs, at: Addressing | None = None) -> torch.Tensor:
        """x [B, L, hidden] -> final-normed outputs [B, L, hidden]; writes the new keys into `cache`. `at`: this
        step's addressing when the caller made it before (`address`), else it is made here."""
        if step.kv_len > cache.capacity:
            raise ValueError(f"sequence longer than the KV cache ({cache.capacity} positions)")
        at = at if at is not None else self.address(cache, step, x.dtype)
        first, last = step.row_range
        keys, values = cache.keys[first:last, :, :, : step.kv_len], cache.values[first:last, :, :, : step.kv_len]
        for index, layer in enumerate(self.layers):
            x = layer(x, index, cache, at, keys[:, index], values[:, index])
        return self.norm(x)
