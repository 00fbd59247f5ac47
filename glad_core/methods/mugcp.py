"""MuGCP (arXiv 2507.08410): prompts conditioned on each image's description and on its visual tokens.

Only the abstract is public, so this is our instantiation; every choice it leaves open is a
hyper-parameter (README, section "MuGCP"). Per image x with description d(x) (`glad_core.descriptions`):

    H    = g_tok(d(x))                 frozen text tower, token-level features [L, w] (padding masked)
    SCP  S = W_s H                     semantic conditional prompt tokens [L, d_token]     (trained W_s)
    P    = W_v LN(T(x))                visual tokens [P, d_token]: a ViT's patch tokens after its last
                                       block, a CNN's spatial map before its global pool   (trained)
    AMG  S' = S + MHA(S; P, P)         vision guides semantics (masked over S's padding)
         P' = P + MHA(P; S', S')       semantics guide vision
         s = mean_L S' , v = mean_P P' the SCP token and the VCP (visual conditional prompt) token
    MPF  add:    v_m(x) = v_m + F_s s + F_v v        (F zero-initialised: training starts at CoOp)
         concat: [v_1 .. v_M, s, v]                  (one extra prompt token per part)
    t_c(x) = g([SOS] MPF {class_c} .)  ->  [B, C, D], the B·C prompts in one text-tower call
    loss = CE + λ · KL(p_zero-shot ‖ p)               λ = kl_weight (default 1), any step rule

`scp=False` drops s from MPF (AMG, if VCP is on, still reads the descriptions); `vcp=False` skips AMG
(s is then the mean of S). Both off: no descriptions are read and the method is CoOp exactly.

Descriptions reach the method through the contract's `use_items` hook: the training loop and
`evaluate` hand it the `Datum` items of each batch before encoding it. `fit` builds the provider
(`build_provider`, from the hyper-parameters), indexes the training images for retrieval, and encodes
each distinct description once (cached by text).

Class glosses (`descriptions: wordnet`, our choice of a label-free test mode): a training image gets
the gloss of its own class (training labels are known), a test image the gloss of the class the
frozen zero-shot model predicts for it (`zero_shot_predictions`), never that of its label.

`keep_attention = True` leaves, after each scored batch, AMG's attention of the description tokens
over the visual tokens in `attention` ([B, H, W] for a CNN map), for figures.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from ..checks import in_range, one_of
from ..data import Datum
from ..descriptions import DescriptionError, DescriptionProvider, make_provider
from ..prompts import PromptLearner, _tokenize, encode_embeddings, token_embedding
from ..encode import causal_text_tower
from .prompt_learning import DASSL_SGD, PROMPT_HPARAMS, CoOp
from .base import Hparam, register

FUSIONS = ("add", "concat")


def _is_bool(v) -> str | None:
    return None if isinstance(v, bool) else "must be true or false"


def _source(v) -> str | None:
    return None if isinstance(v, str) else "must be 'tuxpaint', 'wordnet', a descriptions JSON path, or '' (none)"


MUGCP_HPARAMS = {
    **PROMPT_HPARAMS,
    "scp": Hparam(True, "SCP token (description) enters the fused prompt", _is_bool),
    "vcp": Hparam(True, "VCP token (AMG output) enters the fused prompt", _is_bool),
    "fusion": Hparam("concat", "MPF operator: 'concat' (extra prompt tokens) or 'add' (shift of the context)",
                     one_of(FUSIONS)),
    "amg_heads": Hparam(4, "attention heads of each AMG direction (d_token must be divisible by it)", in_range(1)),
    "descriptions": Hparam("", "description source: 'tuxpaint' (human, per image), 'wordnet' (class glosses), or a "
                           "descriptions JSON path ('' = none)", _source),
    "test_descriptions": Hparam("auto", "what test images get: 'retrieval', 'images', or 'class' (the class text of "
                                "the zero-shot prediction); 'auto': retrieval for human texts, the file's own for "
                                "MLLM ones, class for class texts", one_of(("auto", "retrieval", "images", "class"))),
    "oracle": Hparam(False, "give test images their own human descriptions (an upper bound, recorded)", _is_bool),
}


def visual_token_source(visual: nn.Module) -> tuple[nn.Module, bool]:
    """(module, whether its *input* holds the tokens): a ViT's transformer output, else the input of the
    last global-average-pool module (a CNN's spatial map [B, C, H, W])."""
    if hasattr(visual, "transformer") and hasattr(visual, "class_embedding"):
        return visual.transformer, False
    pools = [m for m in visual.modules() if isinstance(m, nn.AdaptiveAvgPool2d) or type(m).__name__ == "SelectAdaptivePool2d"]
    if pools:
        return pools[-1], True
    raise TypeError(f"MuGCP reads visual tokens from an open_clip ViT or a CNN with a global average pool; "
                    f"{type(visual).__name__} has neither. Use vcp=False, or add its token module here.")


def _as_tokens(x: torch.Tensor, prefix: int) -> torch.Tensor:
    """[B, N, w] tokens from a ViT's [B, N, w] output (first `prefix` tokens dropped) or a map [B, C, H, W]."""
    return x.flatten(2).transpose(1, 2) if x.dim() == 4 else x[:, prefix:]


class AMG(nn.Module):
    """Attention mutual guidance: vision guides the semantic tokens, then semantics guide the visual ones."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"amg_heads={heads} must divide the token width {dim}")
        self.to_semantic = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.to_visual = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, s: torch.Tensor, pad: torch.Tensor, p: torch.Tensor,
                weights: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """s [B, L, d] with padding mask `pad` [B, L] (True = padding), p [B, P, d] -> (S', P', A): A [B, L, P]
        is the attention of the semantic tokens over the visual ones (mean over heads) when `weights`, else None."""
        guided, attention = self.to_semantic(s, p, p, need_weights=weights)
        s = s + guided
        p = p + self.to_visual(p, s, s, key_padding_mask=pad, need_weights=False)[0]
        return s, p, attention


@register("mugcp", order=50, defaults={**DASSL_SGD, "batch_size": 1, "epochs": 10, "kl_weight": 1.0})
class MuGCP(CoOp):
    """MuGCP: context fused with description (SCP) and attention-guided visual (VCP) prompt tokens."""

    per_image = True
    builds_in_fit = True  # the description provider and its retrieval index are built by `fit`
    hparams = MUGCP_HPARAMS

    def __init__(self, clip: nn.Module, tokenizer: Callable, cfg):
        super().__init__(clip, tokenizer, cfg)
        self.parts = [p for p in ("scp", "vcp") if self.hp[p]]
        self.conditioned = bool(self.parts)
        self.provider: DescriptionProvider | None = None
        self._items: tuple[list[Datum], str] | None = None
        self._tokens: torch.Tensor | None = None
        self._grid: tuple[int, int] | None = None  # a CNN map's (H, W); None for a ViT's token sequence
        self._text_cache: dict[str, tuple[torch.Tensor, int]] = {}
        self._zs_text: dict[tuple, torch.Tensor] = {}
        self.keep_attention = False  # True: each scored batch leaves AMG's attention map in `attention`
        self.attention: torch.Tensor | None = None
        if not self.conditioned:
            return
        d = self.ctx.shape[-1]
        width = self._token_features(["x"])[0].shape[-1]
        self.scp_proj = nn.Linear(width, d)
        if self.hp["vcp"]:
            module, on_input = visual_token_source(clip.visual)
            self._prefix = 1 if hasattr(clip.visual, "class_embedding") else 0
            grab = (lambda m, args: self._grab(args[0])) if on_input else (lambda m, args, out: self._grab(out))
            self._hook = (module.register_forward_pre_hook(grab) if on_input else module.register_forward_hook(grab))
            with torch.no_grad():
                size = getattr(clip.visual, "image_size", None) or (32, 32)
                size = (size, size) if isinstance(size, int) else tuple(size)
                clip.encode_image(torch.zeros(1, 3, *size, device=self.ctx.device))
            self.vis_norm = nn.LayerNorm(self._tokens.shape[-1])
            self.vis_proj = nn.Linear(self._tokens.shape[-1], d)
            self.amg = AMG(d, self.hp["amg_heads"])
        if self.hp["fusion"] == "add":
            self.fuse = nn.ModuleDict({p: nn.Linear(d, d) for p in self.parts})
            for lin in self.fuse.values():
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)

    # --- descriptions ----------------------------------------------------------------------------
    def use_items(self, items: Sequence[Datum], split: str) -> None:
        """Remember the batch's items (their descriptions condition the next `class_features`)."""
        self._items = (list(items), split)

    def _grab(self, x: torch.Tensor) -> None:
        self._tokens = _as_tokens(x, getattr(self, "_prefix", 0))
        self._grid = tuple(x.shape[-2:]) if x.dim() == 4 else None

    def _token_features(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen token-level features [N, n, w] of `texts` and their padding mask [N, n] (True = padding)."""
        tower = causal_text_tower(self.clip)
        module = tower.ln_final if tower is not None else self.clip.text.transformer
        limit = self.tokenizer.context_length
        tokens, lengths, _ = _tokenize(self.tokenizer, texts, limit)
        n = max(lengths)
        tokens = tokens[:, :n].to(self.ctx.device)
        out: list[torch.Tensor] = []
        hook = module.register_forward_hook(lambda m, a, o: out.append(o if torch.is_tensor(o) else o[0]))
        try:
            with torch.no_grad():
                encode_embeddings(self.clip, token_embedding(self.clip)(tokens), tokens)
        finally:
            hook.remove()
        pad = torch.arange(n)[None, :] >= torch.tensor(lengths)[:, None]
        return out[0].float(), pad.to(self.ctx.device)

    def set_provider(self, provider: DescriptionProvider) -> None:
        """Use `provider`'s descriptions (already indexed for retrieval when its test mode needs it)."""
        self.provider = provider

    def zero_shot_predictions(self, features: torch.Tensor, classnames: Sequence[str],
                              templates: Sequence[str]) -> list[str]:
        """The class the frozen zero-shot model predicts for each image feature [B, D] (its hand-written
        prompts; the image tower is frozen, so `features` are its own): test mode 'class' reads no label."""
        key = (tuple(classnames), tuple(templates), features.device)
        if key not in self._zs_text:
            with torch.no_grad():
                self._zs_text[key] = self.prompt_features(classnames, templates).to(features.device)
        return [classnames[i] for i in (features.float() @ self._zs_text[key].float().T).argmax(-1).tolist()]

    def texts(self, features: torch.Tensor, classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
        """The description of each image of the current batch (told by `use_items`), features [B, D]."""
        if self.provider is None:
            raise DescriptionError("mugcp has no description provider: set the hyper-parameter 'descriptions' "
                                   "('tuxpaint', 'wordnet' or a JSON path) and train with fit, or call set_provider.")
        if self._items is None or len(self._items[0]) != len(features):
            raise DescriptionError(f"mugcp needs the batch's items before scoring it: call use_items(items, split) "
                                   f"with the {len(features)} items of the batch (the training loop and evaluate do).")
        items, split = self._items
        predicted = (self.zero_shot_predictions(features, classnames, templates)
                     if split == "test" and self.provider.test == "class" else None)
        return self.provider.image_texts(items, split, features=features.float(), predicted=predicted)

    def descriptions(self, features: torch.Tensor, classnames: Sequence[str],
                     templates: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token features [B, L, w] and padding mask of the current batch's descriptions (cached by text)."""
        texts = self.texts(features, classnames, templates)
        new = sorted(set(texts) - set(self._text_cache))
        if new:
            h, pad = self._token_features(new)
            for t, row, p in zip(new, h, pad):
                self._text_cache[t] = (row, int((~p).sum()))
        rows = [self._text_cache[t] for t in texts]
        h = nn.utils.rnn.pad_sequence([r[:n] for r, n in rows], batch_first=True)
        pad = torch.arange(h.shape[1], device=h.device)[None, :] >= torch.tensor([n for _, n in rows],
                                                                                device=h.device)[:, None]
        return h, pad

    # --- scoring ---------------------------------------------------------------------------------
    @property
    def frozen_image_features(self) -> bool:  # type: ignore[override]
        """Without VCP only: VCP reads each batch's visual tokens from `encode_image`, which a cached feature skips."""
        return not self.hp["vcp"]

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        self._tokens = None
        return super().encode_image(images)

    def prompt_tokens(self, image_features: torch.Tensor, classnames: Sequence[str],
                      templates: Sequence[str]) -> dict[str, torch.Tensor]:
        """The per-image conditional tokens {"scp": [B, d], "vcp": [B, d]} of the current batch."""
        h, pad = self.descriptions(image_features, classnames, templates)
        s = self.scp_proj(h.to(self.scp_proj.weight.dtype))
        if self.hp["vcp"]:
            if self._tokens is None or len(self._tokens) != len(h):
                raise RuntimeError("mugcp reads the visual tokens of the batch from its encode_image: encode the "
                                   "batch with method.encode_image before class_features.")
            p = self.vis_proj(self.vis_norm(self._tokens.to(s.dtype)))
            s, p, attention = self.amg(s, pad, p, weights=self.keep_attention)
            if attention is not None:
                self.attention = self._attention_map(attention, pad)
        keep = (~pad)[..., None].to(s.dtype)
        out = {"scp": (s * keep).sum(1) / keep.sum(1)}
        if self.hp["vcp"]:
            out["vcp"] = p.mean(1)
        return {k: out[k] for k in self.parts}

    def _attention_map(self, attention: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """Where AMG's semantic tokens look: A [B, L, P] averaged over the description tokens (padding
        excluded), as [B, H, W] over a CNN's map or a ViT's square patch grid, else [B, P]; detached, on the CPU."""
        keep = (~pad).to(attention.dtype)[..., None]
        a = ((attention * keep).sum(1) / keep.sum(1)).detach().float().cpu()
        side = math.isqrt(a.shape[1])
        grid = self._grid or ((side, side) if side * side == a.shape[1] else None)
        return a.view(len(a), *grid) if grid else a

    def learner(self, classnames: Sequence[str]) -> PromptLearner:
        """CoOp's learner; under 'concat', one with M + parts placeholders whose context is all shift."""
        if not self.conditioned or self.hp["fusion"] == "add":
            return super().learner(classnames)
        key = (tuple(classnames), self.ctx.device, "concat")
        if key not in self._learners:
            learner = PromptLearner(self.clip, self.tokenizer, classnames, n_ctx=self.hp["n_ctx"] + len(self.parts),
                                    position=self.hp["position"], freeze=False)
            del learner.ctx
            learner.ctx = torch.zeros(learner.n_ctx, self.ctx.shape[-1], device=self.ctx.device)
            self._learners[key] = learner
        return self._learners[key]

    def class_features(self, classnames: Sequence[str], templates: Sequence[str],
                       image_features: torch.Tensor | None = None) -> torch.Tensor:
        """[B, C, D] given image features; CoOp's [C, D] with SCP and VCP off; [C, D] in zero-shot mode."""
        if not self._learned or not self.conditioned:
            return super().class_features(classnames, templates)
        if image_features is None:
            raise ValueError("MuGCP's class embeddings depend on the image: pass image_features")
        tokens = self.prompt_tokens(image_features, classnames, templates)
        B = len(image_features)
        if self.hp["fusion"] == "add":
            shift = sum(self.fuse[k](t) for k, t in tokens.items())[:, None, :]
        else:
            shift = torch.cat([self.ctx.expand(B, -1, -1), *(t[:, None, :] for t in tokens.values())], dim=1)
        return self.learner(classnames)(shift=shift.to(self.ctx.dtype), chunk=self._chunk())

    # --- training --------------------------------------------------------------------------------
    def record_info(self) -> dict:
        return {"descriptions": self.provider.describe() if self.provider is not None else None}

    def build_provider(self, items: Sequence[Datum]) -> DescriptionProvider:
        """The provider the hyper-parameters name ('wordnet': class glosses, for training images their own
        class's, for test images the zero-shot prediction's), indexed on the training `items` for retrieval;
        set and returned."""
        source, mode = self.hp["descriptions"], self.hp["test_descriptions"]
        if not source:
            raise DescriptionError("mugcp with SCP or VCP on needs descriptions: set the hyper-parameter "
                                   "'descriptions' to 'tuxpaint', 'wordnet' or a descriptions JSON path "
                                   "(or scp=vcp=false).")
        glosses = source == "wordnet"
        try:
            provider = make_provider(None if glosses else source, "wordnet" if glosses else None,
                                     test=None if mode == "auto" else mode, oracle=self.hp["oracle"])
        except DescriptionError as e:
            raise DescriptionError(f"mugcp descriptions={source!r}, test_descriptions={mode!r}, "
                                   f"oracle={self.hp['oracle']}: {e}") from e
        if provider.test == "retrieval":
            from open_clip.transform import PreprocessCfg, image_transform_v2

            from ..descriptions import frozen_image_features
            from ..runtime import resolve_device

            self.to(resolve_device(self.cfg.device))
            transform = image_transform_v2(PreprocessCfg(**self.clip.visual.preprocess_cfg), is_train=False)
            provider.index(items, frozen_image_features(self, items, transform, self.cfg.eval_batch_size))
        self.set_provider(provider)
        return provider

    def fit(self, items: Sequence[Datum], classnames: Sequence[str], templates: Sequence[str], *,
            val_items: Sequence[Datum] | None = None, checkpoint: str | Path | None = None, progress: bool = True):
        """Build the description provider (`build_provider`), then train with the shared loop."""
        if self.conditioned and self.provider is None:
            self.build_provider(items)
        return super().fit(items, classnames, templates, val_items=val_items, checkpoint=checkpoint,
                           progress=progress)
