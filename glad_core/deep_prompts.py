"""Deep prompts (VPT-deep, IVLP, MaPLe, PromptSRC): learned tokens at the input of the first J transformer blocks.

Text tower, with the context v^0_1 .. v^0_M of a prompt at positions P (after the start token):

    h^0   = [SOS] v^0_1 .. v^0_M {class} . [EOS]          (token embeddings, `PromptLearner`)
    h^j_P ← v^j_1 .. v^j_M   for j = 1 .. J-1          (block j's input at P replaced, its output there dropped)
    h^{j+1} = block_j(h^j)

Image tower (ViT), with prompts u^j ∈ R^{M×w}:

    x^0   = ln_pre([CLS, patches + pos, u^0])             (appended after the positional embedding)
    x^j_{-M:} ← u^j   for j = 1 .. J-1                     (the last M tokens of block j's input replaced)

and the prompt tokens are dropped before pooling. Beyond block J-1 the last prompts stay in the
sequence and are processed like any token, as in MaPLe's and PromptSRC's code
(ResidualAttentionBlock_IVLP / _MaPLe). The prompts enter through forward pre-hooks on the blocks,
installed only while a prompted forward runs (`text_prompts`, `vision_prompts`): outside them the
model is untouched, and the towers' own forwards (with the trimmed-context text path of `encode.py`)
are used unchanged.

Towers: open_clip's CLIP text transformer and ViT (`VisionTransformer`; not its attentional-pooler
variant), and the Hugging Face text towers (BERT-style `encoder.layer`, as glad-mini's MiniLM). A
tower without transformer blocks (glad-mini's EfficientNet image tower, any CNN) has no deep prompts:
`vision_blocks` returns None and `vision_unavailable` says why; methods then prompt the text tower only.
"""
from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Callable, Iterator, Sequence

import torch
from open_clip.hf_model import HFTextEncoder
from open_clip.transformer import VisionTransformer
from torch import nn

from .encode import causal_text_tower
from .prompts import PLACEHOLDER, PromptLearner, _content, token_embedding


def text_blocks(clip: nn.Module) -> tuple[nn.ModuleList, bool]:
    """The text tower's transformer blocks, and whether they take batch-first hidden states."""
    t = causal_text_tower(clip)
    if t is not None:
        return t.transformer.resblocks, t.transformer.batch_first
    text = getattr(clip, "text", None)
    encoder = getattr(getattr(text, "transformer", None), "encoder", None)
    if isinstance(text, HFTextEncoder) and isinstance(getattr(encoder, "layer", None), nn.ModuleList):
        return encoder.layer, True
    raise TypeError(f"deep text prompts need CLIP's causal text transformer or a Hugging Face BERT-style tower "
                    f"(encoder.layer); got a text tower of type {type(text or clip).__name__}")


def vision_unavailable(clip: nn.Module) -> str | None:
    """Why the image tower takes no deep prompts (None when it does)."""
    visual = getattr(clip, "visual", None)
    if not isinstance(visual, VisionTransformer):
        return (f"the image tower ({type(visual).__name__}) has no transformer blocks: deep vision prompts are "
                "unavailable, only the text tower is prompted")
    if visual.attn_pool is not None:
        return "the image tower pools with an attentional pooler: deep vision prompts are unavailable"
    return None


def vision_blocks(clip: nn.Module) -> nn.ModuleList | None:
    """The ViT image tower's transformer blocks, or None when it has none (see `vision_unavailable`)."""
    return None if vision_unavailable(clip) else clip.visual.transformer.resblocks


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, x: torch.Tensor) -> tuple[tuple, dict]:
    return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})


def _check_depth(prompts: Sequence[torch.Tensor], blocks: nn.ModuleList, first: int, tower: str) -> None:
    if first + len(prompts) > len(blocks):
        raise ValueError(f"{first + len(prompts)} layers of {tower} prompts but the {tower} tower has "
                         f"{len(blocks)} blocks: use a depth <= {len(blocks)}")


@contextmanager
def _hooks(blocks: nn.ModuleList, hooks: Sequence[tuple[int, Callable]]) -> Iterator[None]:
    handles = [blocks[j].register_forward_pre_hook(h, with_kwargs=True) for j, h in hooks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _replace_text(p: torch.Tensor, positions: torch.Tensor, batch_first: bool, module, args, kwargs):
    """Block input with the rows' context positions [N, M] replaced by the prompt p [M, d]."""
    x = _hidden(args, kwargs)
    x = x if batch_first else x.transpose(0, 1)
    index = positions[:, :, None].expand(-1, -1, x.shape[-1])
    x = x.scatter(1, index, p.to(x.dtype).expand(x.shape[0], -1, -1))
    return _with_hidden(args, kwargs, x if batch_first else x.transpose(0, 1))


@contextmanager
def text_prompts(clip: nn.Module, prompts: Sequence[torch.Tensor], positions: torch.Tensor) -> Iterator[None]:
    """While active, prompts[j-1] ([M, d]) replace the hidden states at `positions` ([N, M], the context
    tokens of each of the N prompts encoded next) at the input of text block j, j = 1 .. len(prompts)."""
    if not len(prompts):
        yield
        return
    blocks, batch_first = text_blocks(clip)
    _check_depth(prompts, blocks, 1, "text")
    with _hooks(blocks, [(j + 1, partial(_replace_text, p, positions, batch_first)) for j, p in enumerate(prompts)]):
        yield


def _append(p: torch.Tensor, module, args, kwargs):
    x = _hidden(args, kwargs)
    return _with_hidden(args, kwargs, torch.cat([x, p.to(x.dtype).expand(x.shape[0], -1, -1)], dim=1))


def _replace_last(p: torch.Tensor, batch_first: bool, module, args, kwargs):
    x = _hidden(args, kwargs)
    x = x if batch_first else x.transpose(0, 1)
    x = torch.cat([x[:, :-p.shape[0]], p.to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)
    return _with_hidden(args, kwargs, x if batch_first else x.transpose(0, 1))


@contextmanager
def vision_prompts(clip: nn.Module, prompts: Sequence[torch.Tensor]) -> Iterator[None]:
    """While active, the ViT's tokens get prompts[0] ([M, w]) appended after the positional embedding (before
    ln_pre), prompts[j] replace them at the input of block j, and they are dropped before pooling."""
    if not len(prompts):
        yield
        return
    why = vision_unavailable(clip)
    if why:
        raise TypeError(why)
    visual = clip.visual
    blocks = visual.transformer.resblocks
    _check_depth(prompts, blocks, 0, "vision")
    n = prompts[0].shape[0]
    if any(p.shape[0] != n for p in prompts):
        raise ValueError(f"every layer needs the same number of vision prompts, got {[p.shape[0] for p in prompts]}")
    bf = visual.transformer.batch_first
    drop = visual.transformer.register_forward_hook(lambda m, a, out: out[:, :-n])  # NLD after the transformer
    append = visual.ln_pre.register_forward_pre_hook(partial(_append, prompts[0]), with_kwargs=True)
    try:
        with _hooks(blocks, [(j, partial(_replace_last, p, bf)) for j, p in enumerate(prompts) if j > 0]):
            yield
    finally:
        drop.remove()
        append.remove()


def split_init(tokenizer: Callable, init: str, n_ctx: int) -> tuple[list[int], str]:
    """The token ids of the first `n_ctx` tokens of the phrase `init` (they start the context) and the rest of
    the phrase as literal text, as MaPLe's and PromptSRC's prompt learners do: with n_ctx 2, "a photo of a"
    gives the context from "a photo" and the prompts "[SOS] v_1 v_2 of a {class}."."""
    long = tokenizer.context_length + 256
    ids, words = _content(tokenizer, init, long), init.split()
    if len(ids) < n_ctx:
        raise ValueError(f"ctx_init {init!r} has {len(ids)} tokens, fewer than n_ctx={n_ctx}: use a longer phrase, "
                         "n_ctx <= its token count, or ctx_init '' (random context)")
    for k in range(len(words) + 1):
        head, rest = " ".join(words[:k]), " ".join(words[k:])
        head_ids = _content(tokenizer, head, long) if head else []
        if len(head_ids) == n_ctx and head_ids + (_content(tokenizer, rest, long) if rest else []) == ids:
            return head_ids, rest
    raise ValueError(f"the first {n_ctx} tokens of ctx_init {init!r} do not end at a word boundary: choose n_ctx "
                     "to cover whole words")


class DeepPromptLearner(PromptLearner):
    """`PromptLearner` with deep text prompts: `deep` (set by the owner; [M, d] each) replace the context
    positions at the input of text blocks 1 .. len(deep). The context (position "end", after the start token)
    starts from the first `n_ctx` tokens of `init`, the rest of the phrase stays literal text (`split_init`);
    `init=None` gives N(0, std²) and "X .. X {class}." as in the originals."""

    def __init__(self, clip: nn.Module, tokenizer: Callable, classnames: Sequence[str], n_ctx: int,
                 init: str | None = None, std: float = 0.02, freeze: bool = True):
        head, literal = split_init(tokenizer, init, n_ctx) if init else (None, "")
        object.__setattr__(self, "literal", literal)
        super().__init__(clip, tokenizer, classnames, n_ctx=n_ctx, init=None, position="end", std=std, freeze=freeze)
        if head is not None:
            with torch.no_grad():
                self.ctx.copy_(token_embedding(clip)(torch.tensor(head, device=self.tokens.device)).float())
        self.deep: Sequence[torch.Tensor] = ()

    def layout(self, classname: str) -> str:
        return " ".join([*[PLACEHOLDER] * self.n_ctx, *([self.literal] if self.literal else []), classname]) + "."

    def _encode(self, b: torch.Tensor, c: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
        with text_prompts(self.clip, self.deep, self.ctx_positions[c.to(self.ctx_positions.device)]):
            return super()._encode(b, c, shift)
