"""Prompt learning (CoOp, CoCoOp): learned context vectors at the token-embedding level.

A class prompt is a token sequence whose M placeholder tokens "X" carry learned vectors
v_1 ... v_M ∈ R^{d_token} instead of their embeddings (CoOp, Zhou et al., IJCV 2022):

    end:    t_c = g([SOS] v_1 ... v_M  {class_c} . [EOS])
    middle: t_c = g([SOS] v_1 ... v_{M/2}  {class_c}  v_{M/2+1} ... v_M . [EOS])
    front:  t_c = g([SOS] {class_c}  v_1 ... v_M . [EOS])
    p(y = c | x) = softmax_c(τ · cos(f(x), t_c))

g is the frozen text tower after its token-embedding lookup; the context is shared by all classes
(v_m) or class-specific (v^c_m), initialised N(0, 0.02²) or from the token embeddings of a phrase
("a photo of a" gives back the hand-written prompt "a photo of a {class}." exactly).
CoCoOp (Zhou et al., CVPR 2022) conditions the context on the image, v_m(x) = v_m + π(x) with
π = meta-net(f(x)): every image has its own class embeddings t_c(x), [B, C, D], computed here in one
batched call of g over the B·C prompts (or in chunks of rows, to bound evaluation memory).

Towers: CLIP's causal text transformer (positional embeddings, causal mask, ln_final, pooling at the
end-of-text token, projection), run on the prompts' used length only as in `encode.py`; open_clip's
Hugging Face towers (`HFTextEncoder`: the transformer on `inputs_embeds` with the padding mask, then
the tower's own pooler and projection).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from open_clip.hf_model import HFTextEncoder
from torch import nn

from .encode import causal_text_forward, causal_text_tower, class_text_features

POSITIONS = ("end", "middle", "front")
PLACEHOLDER = "X"
_SPARE = 256  # tokenize this far past the context length, so over-long prompts are measured, not truncated


def token_embedding(model: nn.Module) -> nn.Embedding:
    """The token-embedding table of the text tower of an open_clip model."""
    t = causal_text_tower(model)
    if t is not None:
        return t.token_embedding
    text = getattr(model, "text", None)
    if isinstance(text, HFTextEncoder):
        return text.transformer.get_input_embeddings()
    raise TypeError(f"prompt learning supports CLIP's causal text transformer and open_clip's Hugging Face "
                    f"text towers (HFTextEncoder); got a text tower of type {type(text or model).__name__}")


def encode_embeddings(model: nn.Module, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Unnormalised text features [N, D] from token embeddings x [N, n, d] of `tokens` [N, n].

    `tokens` give the end-of-text position (CLIP) or the padding mask (Hugging Face towers).
    """
    t = causal_text_tower(model)
    if t is not None:
        return causal_text_forward(t, x, tokens)
    text = getattr(model, "text", None)
    if not isinstance(text, HFTextEncoder):
        token_embedding(model)  # raises, naming the unsupported tower
    mask = (tokens != text.config.pad_token_id).long()
    out = text.transformer(inputs_embeds=x, attention_mask=mask)
    return text.proj(text.pooler(out, mask))


def meta_net(d_image: int, d_token: int, reduction: int = 16) -> nn.Sequential:
    """CoCoOp's meta-net π: Linear(D, D/16) - ReLU - Linear(D/16, d_token), image feature -> context shift."""
    hidden = d_image // reduction
    return nn.Sequential(nn.Linear(d_image, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, d_token))


def _tokenize(tokenizer: Callable, texts: Sequence[str], length: int) -> tuple[torch.Tensor, list[int], list[int]]:
    """Token ids [N, length] of the texts (untruncated up to `length`), each text's used length (start and
    end tokens included), and the ids of the empty text: [start, end, padding]."""
    empty = tokenizer([""], context_length=length)[0, :3].tolist()
    if empty[1] in (empty[0], empty[2]):
        raise ValueError("prompt learning needs a tokenizer that adds one start and one end token "
                         f"(open_clip's CLIP or BERT-style tokenizers); '' gives {empty}")
    ids = tokenizer(list(texts), context_length=length)
    return ids, [len(r) - r[::-1].index(empty[1]) for r in ids.tolist()], empty


def _content(tokenizer: Callable, text: str, length: int) -> list[int]:
    """Token ids of `text` without its start and end tokens."""
    ids, (n,), _ = _tokenize(tokenizer, [text], length)
    return ids[0, 1:n - 1].tolist()


class PromptLearner(nn.Module):
    """Learned context for `classnames` on the frozen text tower of `clip`; the context is the only parameter.

    n_ctx: context length M (must equal the token count of `init` when `init` is given);
    init: None (N(0, std²)) or a phrase whose token embeddings start the context;
    position: "end" | "middle" | "front" (where the class name goes, as in CoOp);
    class_specific: one context per class ([C, M, d]) instead of one shared ([M, d]);
    freeze: set requires_grad False on every parameter of `clip` (False leaves it to the caller, e.g.
    when the tower also carries LoRA). `clip` is used, not owned: `parameters()` and `state_dict()` hold
    the context only, and `.to()` moves the learner alone.
    """

    def __init__(self, clip: nn.Module, tokenizer: Callable, classnames: Sequence[str], n_ctx: int = 4,
                 init: str | None = None, position: str = "end", class_specific: bool = False,
                 std: float = 0.02, freeze: bool = True):
        super().__init__()
        if position not in POSITIONS:
            raise ValueError(f"unknown prompt position {position!r}; allowed: {list(POSITIONS)}")
        if not classnames:
            raise ValueError("PromptLearner needs at least one class name")
        object.__setattr__(self, "clip", clip)  # not a submodule (see the class docstring)
        if freeze:
            clip.requires_grad_(False)
        embed = token_embedding(clip)
        limit = tokenizer.context_length
        long = limit + _SPARE
        self.classnames = [c.replace("_", " ") for c in classnames]
        self.position, self.class_specific = position, class_specific

        if n_ctx < 1:
            raise ValueError(f"n_ctx must be at least 1, got {n_ctx}")
        self.n_ctx = n_ctx
        placeholder, period = _content(tokenizer, PLACEHOLDER, long), _content(tokenizer, ".", long)
        if len(placeholder) != 1:
            raise ValueError(f"the tokenizer splits the placeholder {PLACEHOLDER!r} into {len(placeholder)} tokens")
        init_ids = _content(tokenizer, init, long) if init is not None else None
        if init_ids is not None and len(init_ids) != n_ctx:
            raise ValueError(f"init phrase {init!r} has {len(init_ids)} tokens but n_ctx={n_ctx}; "
                             f"pass n_ctx={len(init_ids)} or another phrase")
        # The literal prompts "X X X X {class}." as the tokenizer splits them (a class name may merge with
        # the '.' after it); the context replaces exactly the n_ctx placeholder positions.
        tokens, lengths, _ = _tokenize(tokenizer, [self.layout(c) for c in self.classnames], long)
        worst = max(range(len(lengths)), key=lambda i: lengths[i])
        if lengths[worst] > limit:
            raise ValueError(
                f"the prompt of class {self.classnames[worst]!r} needs {lengths[worst]} tokens (n_ctx={n_ctx} "
                f"context, {lengths[worst] - n_ctx} for the start and end tokens, the class name and '.') but "
                f"the text tower's context length is {limit}: use n_ctx <= {limit - lengths[worst] + n_ctx}")
        positions = [self._ctx_positions(n - 1 - len(period)) for n in lengths]
        for c, (row, n, pos) in enumerate(zip(tokens.tolist(), lengths, positions)):
            if any(row[p] != placeholder[0] for p in pos):
                raise ValueError(f"the tokenizer splits {self.layout(self.classnames[c])!r} into {row[:n]}: the "
                                 f"placeholders {PLACEHOLDER!r} are not at the expected positions {pos}")
        tokens = tokens[:, :max(lengths)]
        device = embed.weight.device
        tokens = tokens.to(device)
        self.register_buffer("tokens", tokens, persistent=False)
        self.lengths = torch.tensor(lengths)  # on the CPU: chunk lengths without a device sync
        self.register_buffer("ctx_positions", torch.tensor(positions, device=device), persistent=False)
        with torch.no_grad():
            self.register_buffer("embeddings", embed(tokens).detach(), persistent=False)
            shape = (len(self.classnames), n_ctx, embed.embedding_dim) if class_specific else (n_ctx, embed.embedding_dim)
            if init_ids is None:
                ctx = torch.randn(shape, device=device) * std
            else:
                ctx = embed(torch.tensor(init_ids, device=device)).float().expand(shape)
        self.ctx = nn.Parameter(ctx.float().clone())

    def layout(self, classname: str) -> str:
        """The literal prompt of a class, placeholders where the context goes ("X X X X cat.")."""
        x, half = [PLACEHOLDER] * self.n_ctx, self.n_ctx // 2
        return " ".join({"end": x + [classname], "front": [classname] + x,
                         "middle": x[:half] + [classname] + x[half:]}[self.position]) + "."

    def _ctx_positions(self, tail: int) -> list[int]:
        """Context token positions in a prompt whose '.' starts at `tail` (start token at 0)."""
        M, half = self.n_ctx, self.n_ctx // 2
        first = {"end": M, "front": 0, "middle": half}[self.position]  # context tokens before the class name
        return list(range(1, 1 + first)) + list(range(tail - (M - first), tail))

    @property
    def d_token(self) -> int:
        return self.ctx.shape[-1]

    def forward(self, shift: torch.Tensor | None = None, chunk: int | None = None) -> torch.Tensor:
        """Normalised class text features: [C, D], or [B, C, D] with a per-image context shift.

        shift: [B, n_ctx, d_token] (or [B, 1, d_token], one shift for every context token), added to
        the context of every class for image b. chunk: at most this many prompts per text-tower call
        (default: all B·C in one call).
        """
        C = len(self.classnames)
        if shift is not None and (shift.dim() != 3 or shift.shape[1] not in (1, self.n_ctx)
                                  or shift.shape[2] != self.d_token):
            raise ValueError(f"shift must be [B, {self.n_ctx} or 1, {self.d_token}], got {list(shift.shape)}")
        B = 1 if shift is None else shift.shape[0]
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk must be a positive number of prompts, got {chunk}")
        feats = [self._encode(r // C, r % C, shift) for r in torch.arange(B * C).split(chunk or B * C)]
        f = F.normalize(torch.cat(feats), dim=-1).view(B, C, -1)
        return f[0] if shift is None else f

    def _encode(self, b: torch.Tensor, c: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
        """Features of the prompts (image b[i], class c[i]; CPU indices) at their common used length."""
        n = int(self.lengths[c].max())
        b, c = b.to(self.tokens.device), c.to(self.tokens.device)
        ctx = self.ctx[c] if self.class_specific else self.ctx.expand(len(c), -1, -1)
        if shift is not None:
            ctx = ctx + shift[b]
        x = self.embeddings[c, :n]
        x = x.scatter(1, self.ctx_positions[c, :, None].expand(-1, -1, x.shape[-1]), ctx.to(x.dtype))
        return encode_embeddings(self.clip, x, self.tokens[c, :n])


@torch.no_grad()
def handcrafted_features(clip: nn.Module, tokenizer: Callable, classnames: Sequence[str],
                         templates: Sequence[str] = ("a photo of a {}.",), chunk: int = 1000) -> torch.Tensor:
    """Normalised class features [C, D] of hand-written prompts through the same tower (no learned context):
    the zero-shot classifier, and the target of KgCoOp's term."""
    device = next(clip.parameters()).device
    return class_text_features(clip, tokenizer, classnames, templates, device=device, chunk=chunk)
