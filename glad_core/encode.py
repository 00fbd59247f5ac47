"""Feature extraction for open_clip models: text features at the prompts' own length, class prompts.

Class prompts are short (about 10 tokens) but open_clip pads them to the full context (77 for
CLIP). The transformer's cost grows with sequence length, so `encode_text` trims the padding
columns first. The result is unchanged: CLIP's text transformer is causal (no token attends to the
padding after it) and pools at the end-of-text token; Hugging Face towers mask padding anyway.
"""
from __future__ import annotations

from typing import Callable, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from open_clip.transformer import TextTransformer, text_global_pool


def trim_padding(tokens: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """Drop the trailing columns that are padding in every row."""
    used = (tokens != pad_id).any(dim=0).nonzero()
    return tokens[:, : int(used.max()) + 1] if len(used) else tokens[:, :1]


def causal_text_tower(model: nn.Module) -> nn.Module | None:
    """The module holding a CLIP-style causal text transformer (CLIP itself, or its TextTransformer)."""
    text = getattr(model, "text", None)
    if isinstance(text, TextTransformer) and text.cls_emb is None and not text.use_pad_mask:
        return text
    if text is None and hasattr(model, "token_embedding") and hasattr(model, "attn_mask"):
        return model
    return None


def encode_text(model: nn.Module, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """`model.encode_text(tokens)` computed on the tokens' used length only."""
    t = causal_text_tower(model)
    if t is None:  # Hugging Face towers and others: padding is masked, trimming alone suffices
        pad = getattr(getattr(getattr(model, "text", None), "config", None), "pad_token_id", 0) or 0
        return model.encode_text(trim_padding(tokens, pad), normalize=normalize)
    tokens = trim_padding(tokens)
    x = causal_text_forward(t, t.token_embedding(tokens), tokens)
    return F.normalize(x, dim=-1) if normalize else x


def causal_text_forward(t: nn.Module, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The causal tower `t` after its token-embedding lookup: embeddings x [N, n, d] of `tokens` [N, n]
    (used for pooling at the end-of-text token) to unnormalised text features [N, D]."""
    n = tokens.shape[1]
    cast = t.transformer.get_cast_dtype()
    x = x.to(cast) + t.positional_embedding[:n].to(cast)
    mask = t.attn_mask[:n, :n] if t.attn_mask is not None else None
    x = t.ln_final(t.transformer(x, attn_mask=mask))
    pool = getattr(t, "text_pool_type", None) or getattr(t, "pool_type", "argmax")
    eos = getattr(t, "text_eos_id", None) or getattr(t, "eos_id", None)
    x = text_global_pool(x, tokens, pool, eos_token_id=eos)
    if t.text_projection is not None:
        x = t.text_projection(x) if isinstance(t.text_projection, nn.Linear) else x @ t.text_projection
    return x


Template = Union[str, Callable[[str], str]]


def prompts(classnames: Sequence[str], templates: Sequence[Template]) -> list[str]:
    """All prompts, template-major: templates[0] for every class, then templates[1], ...

    A template is a format string ("a photo of a {}.") or a function of the class name (open_clip's)."""
    return [tpl(c.replace("_", " ")) if callable(tpl) else tpl.format(c.replace("_", " "))
            for tpl in templates for c in classnames]


def class_text_features(model: nn.Module, tokenizer: Callable, classnames: Sequence[str],
                        templates: Sequence[str], device: torch.device | str = "cpu",
                        chunk: int = 1000) -> torch.Tensor:
    """One normalised text feature per class: the mean over templates of normalised embeddings.

    Differentiable (no `no_grad` here): during training the text tower carries LoRA.
    """
    tokens = tokenizer(prompts(classnames, templates)).to(device)
    feats = torch.cat([encode_text(model, t) for t in tokens.split(chunk)])
    feats = feats.view(len(templates), len(classnames), -1).mean(0)
    return F.normalize(feats, dim=-1)
