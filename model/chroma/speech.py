"""The Chroma speech model: Backbone (codebook 0 of each frame) and Decoder (codebooks 1..7).

Module and parameter names are the official ones (`backbone.codebook0_head`, `decoder.codebook_head`, ...).
Every method takes a batch of turns, so the offline generator and the batched engine share the same math.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from model.chroma.config import ChromaConfig, SpeechTransformerConfig
from model.chroma.layers import Addressing, KVCache, StepInputs, TransformerStack, to_dtype
from model.chroma.sampling import SamplingBatch, sample_tokens


class AudioEmbedding(nn.Module):
    """One table for all codebooks: code c of codebook k is row c + k * vocab."""

    def __init__(self, num_codebooks: int, vocab_size: int, dim: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.embed_audio_tokens = nn.Embedding(num_codebooks * vocab_size, dim)

    def codebook(self, codes: torch.Tensor, codebook: int) -> torch.Tensor:
        return self.embed_audio_tokens(codes + codebook * self.vocab_size)

    def frames(self, frames: torch.Tensor) -> torch.Tensor:
        """[..., num_codebooks] codes -> [..., dim], the sum over the frame's codebooks."""
        offsets = torch.arange(frames.shape[-1], device=frames.device) * self.vocab_size
        return self.embed_audio_tokens(frames + offsets).sum(dim=-2)


class Backbone(nn.Module):
    def __init__(self, config: SpeechTransformerConfig):
        super().__init__()
        self.model = TransformerStack(config)
        self.codebook0_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.audio_embedding = AudioEmbedding(config.audio_num_codebooks, config.vocab_size, config.hidden_size)


class CodebookHead(nn.Module):
    """One [hidden, vocab] matrix per codebook 1..7, applied as x @ W[k-1]."""

    def __init__(self, num_codebooks: int, hidden_size: int, vocab_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_codebooks, hidden_size, vocab_size))


class Decoder(nn.Module):
    def __init__(self, config: SpeechTransformerConfig):
        super().__init__()
        self.projection = nn.Linear(config.audio_embedding_dim, config.hidden_size, bias=False)
        self.model = TransformerStack(config)
        self.codebook_head = CodebookHead(config.audio_num_codebooks - 1, config.hidden_size, config.vocab_size)
        self.audio_embedding = AudioEmbedding(
            config.audio_num_codebooks, config.vocab_size, config.audio_embedding_dim
        )


@dataclass
class DecodeInputs:
    """What one batched decode step feeds cache rows [0, B): [B] tensors on the model's device.

    length: the row's new backbone positions: 1 = its previous frame, 3 = that frame and a Reasoner pair, 2 = a
            Reasoner pair alone (a turn's first step, right after its voice prefix), 0 = a padding row, which
            writes only the cache's scratch column and whose outputs nobody reads.
    """

    start: torch.Tensor  # [B] long: cache column of the row's first new position
    length: torch.Tensor  # [B] long
    token: torch.Tensor  # [B] long: the Reasoner pair's token (any value on rows without a pair)
    hidden: torch.Tensor  # [B, H] float32: the pair's hidden state
    sampling: SamplingBatch


class SpeechModel(nn.Module):
    """Backbone + Decoder, with the per-step operations of the generation algorithm (SPEC steps 4-6)."""

    def __init__(self, config: ChromaConfig):
        super().__init__()
        self.config = config
        self.backbone = Backbone(config.backbone_config)
        self.decoder = Decoder(config.decoder_config)
        # The thinker's input token embedding (its hidden size equals the backbone's): E_text in the SPEC.
        text_vocab = config.thinker_config["text_config"]["vocab_size"]
        self.text_embedding = nn.Embedding(text_vocab, config.backbone_config.hidden_size)
        self._decoder_step_cache: dict[tuple[int, torch.device], list[tuple[StepInputs, Addressing]]] = {}

    def tie_weights(self) -> None:
        # Upstream ties the two audio embeddings; its checkpoints carry only the decoder's copy.
        self.backbone.audio_embedding.embed_audio_tokens.weight = self.decoder.audio_embedding.embed_audio_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.backbone.codebook0_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.codebook0_head.weight.dtype

    def frame_embeddings(self, frames: torch.Tensor) -> torch.Tensor:
        return self.backbone.audio_embedding.frames(frames)

    def voice_prompt_embeddings(self, transcript_ids: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """SPEC step 1 for one voice: [text_start, transcript..., text_end, reference frames..., zero] -> [P, H].
        transcript_ids [n] are tokenised without special tokens; codes are the reference frames [F, 8]."""
        config = self.config
        ids = torch.cat([
            torch.tensor([config.text_start_token_id]), transcript_ids.cpu(), torch.tensor([config.text_end_token_id])
        ]).to(self.device)
        text = self.text_embedding(ids)
        zero = torch.zeros_like(text[:1])
        return torch.cat([text, self.frame_embeddings(codes.to(self.device)), zero], dim=0)

    def reasoner_pair(self, token: int | torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The two backbone inputs a thinker step injects: [its hidden state, E_text(its token)]. One step's (an
        int, [H]) -> [2, H]; a batch's ([B] ids, [B, H]) -> [B, 2, H]."""
        text = self.text_embedding(torch.as_tensor(token, device=self.device))
        return torch.stack([hidden.to(self.device, self.dtype), text], dim=-2)

    def allocate_backbone_cache(self, rows: int, capacity: int | None = None) -> KVCache:
        return self.backbone.model.allocate_cache(rows, capacity)

    def backbone_step(self, embeds: torch.Tensor, cache: KVCache, step: StepInputs, last: torch.Tensor):
        """Run the backbone over new positions and return (x, codebook-0 logits) at each row's last real
        position `last` [B] (an index into L)."""
        out = self.backbone.model(to_dtype(embeds, self.dtype), cache, step)
        x = out[torch.arange(out.shape[0], device=out.device), last]
        return x, self.backbone.codebook0_head(x)

    def decode_step(
        self, cache: KVCache, frame_embedding: torch.Tensor, inputs: DecodeInputs, width: int, kv_len: int
    ) -> torch.Tensor:
        """One step of every turn in cache rows [0, B), gpt-fast style (batch row i is cache row i): the backbone
        over each row's new positions, then the decoder's frame completion -> frames [B, 8].

        frame_embedding [rows >= B, H]: each row's previous frame embedded, the input of its next step; real rows
        get their new frame's. width (new positions per row, padded) and kv_len (cache columns attention reads)
        are host ints: with them the shapes are static and there is no host sync, so one CUDA graph per
        (B, width, kv_len) replays the whole step."""
        batch = inputs.start.shape[0]
        previous = frame_embedding[:batch, None]  # [B, 1, H]
        if width == 1:
            embeds = previous
        else:
            pair = self.reasoner_pair(inputs.token, inputs.hidden)  # [B, 2, H]
            with_frame = torch.cat([previous, pair], dim=1)  # [B, 3, H]
            pair_alone = torch.cat([pair, previous], dim=1)  # a first step: its third position is padding
            embeds = torch.where((inputs.length == 2)[:, None, None], pair_alone, with_frame)[:, :width]
        step = StepInputs.first_rows(inputs.start, inputs.length, width, kv_len)
        x, logits = self.backbone_step(embeds, cache, step, (inputs.length - 1).clamp(min=0))
        frames = self.sample_frames(x, logits, inputs.sampling)
        real = (inputs.length > 0)[:, None]
        frame_embedding[:batch] = torch.where(real, self.frame_embeddings(frames), frame_embedding[:batch])
        return frames

    def sample_frames(self, x: torch.Tensor, logits: torch.Tensor, sampling: SamplingBatch) -> torch.Tensor:
        """Backbone outputs x [B, H] and codebook-0 logits [B, V] -> frames [B, 8]: codebook 0 sampled from the
        logits, then the decoder's codebooks 1..7."""
        sampling = sampling.for_frame(self.config.audio_num_codebooks, logits.shape[-1])
        return self.complete_frames(x, self.sample(logits, sampling, 0), sampling)

    def complete_frames(self, x: torch.Tensor, codebook0: torch.Tensor, sampling: SamplingBatch) -> torch.Tensor:
        """SPEC step 5 for a batch: backbone outputs x [B, H] and codebook-0 codes [B] -> frames [B, 8].

        The decoder gets a fresh 8-position cache per frame. Rotary positions follow upstream: both inputs of
        sub-step 1 sit at position 0, sub-step k >= 2 at position k - 1."""
        decoder = self.decoder
        batch = x.shape[0]
        cache = decoder.model.allocate_cache(batch, capacity=self.config.audio_num_codebooks)
        inputs = torch.stack([x, decoder.audio_embedding.codebook(codebook0, 0)], dim=1)
        codes = [codebook0]
        for codebook, (step, addressing) in enumerate(self._decoder_steps(batch, x.device), start=1):
            out = decoder.model(decoder.projection(to_dtype(inputs, self.dtype)), cache, step, addressing)[:, -1]
            logits = out @ decoder.codebook_head.weight[codebook - 1]
            code = self.sample(logits, sampling, codebook)
            codes.append(code)
            inputs = decoder.audio_embedding.codebook(code, codebook)[:, None]
        return torch.stack(codes, dim=1)

    def _decoder_steps(self, batch: int, device: torch.device) -> list[tuple[StepInputs, Addressing]]:
        """Addressing of the 7 decoder sub-steps for a batch size, made once: they are the same every frame, and
        making device tensors in the per-frame loop would cost host-device copies (on CUDA, a stall; inside a graph
        capture, an error: the warm-up run before a capture makes them)."""
        key = (batch, device)
        if key not in self._decoder_step_cache:
            stack = self.decoder.model
            cache = stack.allocate_cache(batch, capacity=self.config.audio_num_codebooks)  # only its `visible` is used
            rows = list(range(batch))
            steps = []
            for codebook in range(1, self.config.audio_num_codebooks):
                # Sub-step 1 writes cache columns 0 and 1, both at rotary position 0; sub-step k column k at k - 1.
                start, length = (0, 2) if codebook == 1 else (codebook, 1)
                positions = torch.full((batch, length), max(codebook - 1, 0))
                step = StepInputs.contiguous(rows, [start] * batch, [length] * batch, device, positions=positions)
                steps.append((step, stack.address(cache, step, self.dtype)))
            self._decoder_step_cache[key] = steps
        return self._decoder_step_cache[key]

    def sample(self, logits: torch.Tensor, sampling: SamplingBatch, codebook: int) -> torch.Tensor:
        # Codes the codec cannot decode (the pad/eos extension of the vocab) are never produced: upstream
        # would crash in the codec on them, so masking them keeps parity for every decodable output.
        logits = to_dtype(logits, torch.float32)
        logits[:, self.config.codec_codebook_size:] = float("-inf")
        return sample_tokens(logits, sampling, codebook)
