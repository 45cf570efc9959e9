"""Prompt tuning (Lester et al., 2021): ``prompt_length`` trained embeddings joined to the input.

The prompt [P, E] (E: the embeddings' output width) is prepended to the embeddings' output
(``combine="prefix"``) or placed after its first token (``"prefix_after_bos"``), and the attention
mask the backbone receives gets P ones at the front, so every token sees the prompt. The
backbone's output therefore has P more positions, the prompt's first, as in AdapterHub; a head on
an :class:`~adaptercli.AdapterModel` pads its mask and token labels to match. Only where the model
builds its attention mask from the embeddings' output (``prompts`` in the architecture table);
on DeBERTa, which builds its mask from the input, the mask each attention module receives gets P
rows and columns of ones at the front instead, as AdapterHub widens it.
Weights: ``prompt_tuning.prompt_tunings.<name>.prompt_embedding.weight``, AdapterHub's key.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from ..architectures import get_module, transformer_layers
from ..composition import BatchSplit, CompositionBlock, blocks_in, row_groups
from ..schema import spec
from .base import ConfigError, MethodConfig
from .family import AdapterState, MethodFamily


@dataclasses.dataclass
class PromptTuningConfig(MethodConfig):
    """Prompt tuning config (AdapterHub's ``PromptTuningConfig``).

    Attributes:
        prompt_length: number of prompt positions.
        prompt_init: "random_uniform" (in ±random_uniform_scale) or "from_string" (the embeddings
            of ``prompt_init_text``'s tokens, repeated to the length).
        prompt_init_text: the text whose token embeddings start the prompt (``from_string``).
        random_uniform_scale: the half-width of the "random_uniform" initialisation.
        combine: where the prompt goes: "prefix" (before the input) or "prefix_after_bos" (after
            its first token).
        init_weights_seed: seed the random generator with this before initialising the weights
            (None or 0: the global random state).
    """

    family: ClassVar[str] = "prompt_tuning"

    prompt_length: int = spec(10, ge=1)
    prompt_init: str = spec("random_uniform", choices=("random_uniform", "from_string"))
    prompt_init_text: str | None = None
    random_uniform_scale: float = spec(0.5, gt=0)
    combine: str = spec("prefix", choices=("prefix", "prefix_after_bos"))
    init_weights_seed: int | None = None

    def validate(self) -> None:
        if self.prompt_init == "from_string" and not self.prompt_init_text:
            raise ConfigError("prompt_init_text: prompt_init 'from_string' needs the text")


class Prompt(nn.Module):
    def __init__(self, width: int, config: PromptTuningConfig, embed: nn.Module | None, tokenize=None):
        super().__init__()
        if config.init_weights_seed:
            torch.manual_seed(config.init_weights_seed)
        self.combine = config.combine
        self.prompt_embedding = nn.Embedding(config.prompt_length, width)
        with torch.no_grad():
            if config.prompt_init == "random_uniform":
                nn.init.uniform_(self.prompt_embedding.weight, -config.random_uniform_scale,
                                 config.random_uniform_scale)
            else:
                ids = tokenize(config.prompt_init_text)
                ids = (ids * math.ceil(config.prompt_length / len(ids)))[: config.prompt_length]
                self.prompt_embedding.weight.copy_(embed(torch.tensor(ids, device=embed.weight.device)))

    def join(self, embedded: torch.Tensor) -> torch.Tensor:
        prompt = self.prompt_embedding.weight.to(embedded.dtype).unsqueeze(0).expand(embedded.shape[0], -1, -1)
        if self.combine == "prefix":
            return torch.cat([prompt, embedded], dim=1)
        return torch.cat([embedded[:, :1], prompt, embedded[:, 1:]], dim=1)


class PromptTuningFamily(MethodFamily):
    name = "prompt_tuning"
    config_class = PromptTuningConfig
    containers = ("prompt_tunings",)
    # A top-level BatchSplit (per-row adapters, `forward_rows`): each group of rows joins its own
    # prompt (or none), see `_activate_rows`.
    blocks = ("Stack", "BatchSplit")

    def add(self, state: AdapterState, name: str, config: PromptTuningConfig) -> None:
        arch = state.require_architecture("prompt tuning")
        if not arch.prompts:
            raise ConfigError(f"prompt tuning is not available on {state.model_type}: it joins encoders whose "
                              "attention mask follows the embeddings' output (BERT-like, DistilBERT, ALBERT, DeBERTa), "
                              "as in AdapterHub")
        embed = state.backbone.get_input_embeddings()
        width = embed.weight.shape[1]
        tokenize = None
        if config.prompt_init == "from_string":
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(state.model.config._name_or_path)
            tokenize = lambda text: tokenizer(text)["input_ids"]  # noqa: E731
        if not hasattr(state.root, "prompt_tuning"):
            state.root.add_module("prompt_tuning", nn.Module())
            state.root.prompt_tuning.add_module("prompt_tunings", nn.ModuleDict())
        state.root.prompt_tuning.prompt_tunings[name] = Prompt(width, config, embed, tokenize)

    def _prompt(self, state: AdapterState, setup: str | CompositionBlock) -> Prompt | None:
        """The prompt rows running ``setup`` join: its first prompt-tuning adapter's (as AdapterHub)."""
        names = [setup] if isinstance(setup, str) else setup.flatten()
        prompts = getattr(getattr(state.root, "prompt_tuning", None), "prompt_tunings", {})
        return next((prompts[n] for n in names if n in prompts), None)

    def positions_before(self, state: AdapterState, setup: str | CompositionBlock) -> int:
        prompt = self._prompt(state, setup)
        return 0 if prompt is None else prompt.prompt_embedding.num_embeddings

    def activate(self, state: AdapterState, setup: CompositionBlock | None) -> list[RemovableHandle]:
        names = self.active_names(state, setup)
        if not names:
            return []
        if isinstance(setup, BatchSplit):
            return self._activate_rows(state, setup)
        if any(isinstance(b, BatchSplit) for b in blocks_in(setup)):
            raise ConfigError(f"prompt tuning adapters split rows in a BatchSplit at the top of the setup, not in {setup!r}")
        prompt = state.root.prompt_tuning.prompt_tunings[names[0]]  # as AdapterHub: the first one
        length = prompt.prompt_embedding.num_embeddings

        def widen_mask(module, args, kwargs):
            mask = _mask(args, kwargs)
            if isinstance(mask, torch.Tensor) and mask.dim() == 2:
                return _with_mask(args, kwargs, torch.cat([mask.new_ones(mask.shape[0], length), mask], dim=1))
            return args, kwargs

        def widen_attention_mask(module, args, kwargs):  # [B, 1, N, N] -> [B, 1, P + N, P + N]
            return _with_mask(args, kwargs, nn.functional.pad(_mask(args, kwargs), (length, 0, length, 0), value=1))

        def join(module, args, output: Any):
            return prompt.join(output)

        return _install(state, join, widen_mask, widen_attention_mask)

    def _activate_rows(self, state: AdapterState, setup: BatchSplit) -> list[RemovableHandle]:
        """Each group of rows joins its own prompt (or none). The backbone's output is as long as
        the input plus the longest prompt; a group whose prompt is shorter by ``k`` positions has
        ``k`` masked positions in front, then exactly what it has alone (its prompt, its input), so
        that after the shift its rows equal their own forward pass (``offsets``)."""
        def plan(batch: int) -> tuple[list[tuple[slice, Prompt | None, int]], int]:
            groups = [(rows, self._prompt(state, child)) for rows, child in row_groups(setup, batch)]
            lengths = [0 if p is None else p.prompt_embedding.num_embeddings for _, p in groups]
            longest = max(lengths)
            return [(rows, p, longest - n) for (rows, p), n in zip(groups, lengths, strict=True)], longest

        def join(module, args, output: torch.Tensor) -> torch.Tensor:
            groups, longest = plan(output.shape[0])
            joined = output.new_zeros(output.shape[0], output.shape[1] + longest, output.shape[2])
            for rows, prompt, offset in groups:
                joined[rows, offset:] = output[rows] if prompt is None else prompt.join(output[rows])
            return joined

        def widen_mask(module, args, kwargs):  # [B, N] -> [B, P + N]: 0 before each row's own prompt
            mask = _mask(args, kwargs)
            if mask is None:
                inputs = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("input_ids")
                if inputs is None:
                    inputs = kwargs["inputs_embeds"]
                mask = torch.ones(inputs.shape[:2], dtype=torch.long, device=inputs.device)
            if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
                return args, kwargs
            groups, longest = plan(mask.shape[0])
            wide = torch.cat([mask.new_zeros(mask.shape[0], longest), mask], dim=1)
            for rows, _, offset in groups:
                wide[rows, offset:longest] = 1
            return _with_mask(args, kwargs, wide)

        def widen_attention_mask(module, args, kwargs):  # [B, 1, N, N] -> [B, 1, P + N, P + N]
            mask = _mask(args, kwargs)
            groups, longest = plan(mask.shape[0])
            size = mask.shape[-1] + longest
            wide = mask.new_zeros(*mask.shape[:-2], size, size)
            for rows, _, offset in groups:
                wide[rows, ..., offset:, offset:] = nn.functional.pad(mask[rows], (longest - offset, 0) * 2, value=1)
            return _with_mask(args, kwargs, wide)

        return _install(state, join, widen_mask, widen_attention_mask)


def _mask(args: tuple, kwargs: dict) -> Any:
    """The attention mask a forward (pre-hook) receives: its second positional argument or the keyword."""
    return args[1] if "attention_mask" not in kwargs and len(args) > 1 else kwargs.get("attention_mask")


def _with_mask(args: tuple, kwargs: dict, mask: torch.Tensor) -> tuple[tuple, dict]:
    """``args, kwargs`` with the attention mask replaced where it came (see ``_mask``)."""
    if "attention_mask" not in kwargs and len(args) > 1:
        return (args[0], mask, *args[2:]), kwargs
    return args, {**kwargs, "attention_mask": mask}


def _install(state: AdapterState, join, widen_mask, widen_attention_mask) -> list[RemovableHandle]:
    """The prompt joined after the embeddings, and the mask widened where the architecture reads it:
    at the backbone's input, or (``prompts="attention"``, DeBERTa) at each attention module."""
    embeddings = get_module(state.backbone, state.arch.embeddings)
    handles = [embeddings.register_forward_hook(join)]
    if state.arch.prompts == "attention":
        return handles + [get_module(layer, state.arch.attention).register_forward_pre_hook(
            widen_attention_mask, with_kwargs=True) for layer in transformer_layers(state.backbone, state.arch)]
    return handles + [state.backbone.register_forward_pre_hook(widen_mask, with_kwargs=True)]
