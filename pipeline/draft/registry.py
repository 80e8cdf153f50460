"""One shape for draft heads, and the registry the stages find them in.

A head is a :class:`DraftHead`: how it is built from a store (the fields it reads, its module and objective), its
training loss and held-out chain metrics, one drafting step, and its export layout. Training
(:mod:`pipeline.train.variants`), drafting (:mod:`pipeline.evaluate.drafter`), export and load
(:mod:`pipeline.draft.export`) and the CLI's ``--variant`` choices all go through :func:`get` / :func:`names`, so a
new head is one new module that defines a ``DraftHead`` subclass and calls :func:`register`.

The built-in heads (EAGLE-1, EAGLE-3) are imported the first time they are asked for. Other modules are loaded
from the ``PIPELINE_PLUGINS`` environment variable (comma-separated module paths, imported once, before the first
look-up) or register themselves when imported in-process.

The module's config dataclass carries its head's name as ``variant`` (a ``ClassVar``): that is what a run's
``draft.json`` and an export's ``pipeline.variant`` record, and how a saved head finds its code again.
"""

from __future__ import annotations

import importlib
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

PLUGINS_ENV = "PIPELINE_PLUGINS"
# Built-in heads by module: imported only when asked for (they import this module to register themselves).
BUILTIN = {"eagle1": "pipeline.draft.eagle1", "eagle3": "pipeline.draft.eagle3"}

_HEADS: dict[str, DraftHead] = {}
_plugins_loaded: set[str] = set()


class DraftHead(ABC):
    """A draft-head family. ``cfg`` below is a :class:`pipeline.train.trainer.TrainConfig` (read by attribute);
    ``model`` an instance of :attr:`module_class` built from :attr:`config_class`."""

    name: ClassVar[str]  # --variant value, recorded in runs and exports (= config_class.variant)
    config_class: ClassVar[type]  # a dataclass with to_dict/from_dict (draft.common.DraftConfigMixin)
    module_class: ClassVar[type[nn.Module]]  # module_class(config); has FROZEN, load_target_weights, draft_state_dict
    layer_prefix: ClassVar[str] = "layers.0."  # where the module keeps its decoder layer's weights
    export_formats: ClassVar[tuple[str, ...]] = ("vllm",)
    vllm_method: ClassVar[str | None] = None  # vLLM's speculative_config method serving the export (None: none)
    # the held-out simulated chain's depth, at least: one depth for every head and training length, so that
    # held-out τ (and the best checkpoint it picks) compares across heads and settings such as --ttt-steps
    CHAIN_STEPS: ClassVar[int] = 5

    # ---- built from the store --------------------------------------------------------------------------------

    @abstractmethod
    def required_fields(self, cfg: Any) -> tuple[str, ...]:
        """Store arrays the loader must read (beyond input_ids/loss_mask/doc ids)."""

    @abstractmethod
    def build(self, cfg: Any, reader: Any) -> tuple[nn.Module, Any, dict]:
        """(module with the frozen target pieces loaded from ``reader``, its objective, facts to log and to record
        in draft.json: at least ``{"variant", "config"}``)."""

    def from_config(self, config: dict) -> nn.Module:
        """An untrained module from a recorded ``config`` dict (a run's draft.json, an export's draft_config)."""
        return self.module_class(self.config_class.from_dict(config))

    # ---- training and held-out metrics ---------------------------------------------------------------------

    @abstractmethod
    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], objective: Any) -> tuple[torch.Tensor, dict]:
        """(scalar loss, metrics incl. ``tokens`` / ``tokens_i`` weights) of one collated batch."""

    @abstractmethod
    def chain_steps(self, cfg: Any) -> int:
        """Drafting depth simulated for the held-out conditional acceptances."""

    @abstractmethod
    def chain_acceptance(self, model: nn.Module, batch: dict[str, torch.Tensor], steps: int) -> dict:
        """``{"cond_acc": [...], "eligible": [...]}`` of a simulated greedy chain of ``steps`` drafts."""

    # ---- drafting ------------------------------------------------------------------------------------------

    def aux_layer_ids(self, config: Any) -> list[int]:
        """HF hidden-state indices the head reads besides the last one (none by default)."""
        return list(getattr(config, "aux_layer_ids", None) or [])

    @abstractmethod
    def row_inputs(self, model: nn.Module, hidden_states: Sequence[torch.Tensor], aux_layer_ids: Sequence[int],
                   rows: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        """The head's hidden input ``[1, R, H]`` for target rows ``rows`` (all if None) of one target forward's
        ``hidden_states`` (HF ``output_hidden_states``)."""

    def draft_step(self, model: nn.Module, hidden: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor,
                   cache: Any, mask: torch.Tensor, last_only: bool) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(hidden fed to child rows, logits over the *target* vocabulary) of one drafting step."""
        return model.step(hidden, ids, positions, cache, mask, last_only=last_only)

    # ---- export --------------------------------------------------------------------------------------------

    @abstractmethod
    def export_layout(self, model: nn.Module, config: Any, fmt: str, body: dict, dtype: torch.dtype,
                      num_speculative_tokens: int) -> tuple[dict, dict[str, torch.Tensor], str]:  # fmt: skip
        """(config.json without the ``pipeline`` block, weights to save, the layer prefix used in them) of
        ``model`` with ``config`` for ``fmt`` (one of :attr:`export_formats`); ``body`` holds the HF Llama fields
        of a one-layer draft."""

    def servable(self, model: nn.Module) -> nn.Module:
        """The module to export: one that reads what the serving engines feed (``model`` itself unless the head
        was trained on transformed store features, e.g. EAGLE-3's projected aux features)."""
        return model

    def target_pieces(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The frozen target weights the head needs at load (written to the export's sidecar)."""
        state = model.state_dict()
        return {k: state[k] for k in model.FROZEN}

    def optional_weights(self, config: Any) -> set[str]:
        """Module state an export may leave out (loaded from the target, or defaults)."""
        return set(self.module_class.FROZEN)


def register(head: DraftHead) -> DraftHead:
    """Make ``head`` available under ``head.name`` (a later registration of the same name replaces it)."""
    if getattr(head.config_class, "variant", None) != head.name:
        raise ValueError(f"draft head {head.name!r}: its config class {head.config_class.__name__} must carry "
                         f"variant = {head.name!r} (saved heads find their code by it)")  # fmt: skip
    _HEADS[head.name] = head
    return head


def _load_plugins() -> None:
    for module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        if module in _plugins_loaded:
            continue
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ImportError(f"{PLUGINS_ENV}: cannot import draft-head module {module!r} ({e})") from e
        _plugins_loaded.add(module)


def names() -> list[str]:
    """Every head name: the built-in ones and those registered or named in ``PIPELINE_PLUGINS``."""
    _load_plugins()
    return sorted(set(BUILTIN) | set(_HEADS))


def get(name: str) -> DraftHead:
    """The head registered as ``name``; ValueError naming the choices for an unknown one."""
    _load_plugins()
    if name not in _HEADS and name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    if name not in _HEADS:
        raise ValueError(f"draft head {name!r} is not registered: choose one of {', '.join(names())} (other heads: "
                         f"name their module in {PLUGINS_ENV})")  # fmt: skip
    return _HEADS[name]


def head_of(model: nn.Module) -> DraftHead:
    """The head a draft module belongs to (by its config's ``variant``)."""
    variant = getattr(getattr(model, "config", None), "variant", None)
    if variant is None:
        raise TypeError(f"not a draft head: {type(model).__name__}")
    return get(variant)
