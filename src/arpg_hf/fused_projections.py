"""Projection fusion as diffusers does it (`fuse_qkv_projections()`): real fused modules swapped in and out."""

from __future__ import annotations

import torch
from torch import nn


class FusedProjections:
    """Mixin of a module whose bias-free projections of one input can run as one GEMM, as diffusers'
    `fuse_qkv_projections()` does: `fuse_projections()` swaps in a real `nn.Linear` holding the parts' weights side by
    side (e.g. `qkv_proj` for `q_proj`, `k_proj`, `v_proj`) and removes the parts; `unfuse_projections()` swaps them
    back. State dicts always hold the parts, so saved folders keep the checkpoint layout."""

    fusions: dict[str, tuple[str, ...]] = {}  # fused name -> the names of its parts

    def register_fusions(self) -> None:
        """Called at the end of `__init__`: no fused projection yet, and the state-dict hooks."""
        for fused_name in self.fusions:
            setattr(self, fused_name, None)
        self.register_state_dict_post_hook(_state_dict_with_parts)
        self.register_load_state_dict_pre_hook(_load_parts_into_fused)

    def project(self, hidden_states: torch.Tensor, fused_name: str) -> tuple[torch.Tensor, ...]:
        """The parts' outputs, through the fused projection when there is one."""
        fused = getattr(self, fused_name)
        if fused is None:
            return tuple(getattr(self, name)(hidden_states) for name in self.fusions[fused_name])
        return fused(hidden_states).chunk(len(self.fusions[fused_name]), dim=-1)

    def fuse_projections(self) -> None:
        for fused_name, names in self.fusions.items():
            if getattr(self, fused_name) is not None:
                continue
            parts = [getattr(self, name) for name in names]
            weight = parts[0].weight
            fused = nn.Linear(weight.shape[1], len(parts) * weight.shape[0], bias=False, device="meta")
            with torch.no_grad():
                fused.weight = nn.Parameter(torch.cat([part.weight for part in parts]), weight.requires_grad)
            setattr(self, fused_name, fused.train(parts[0].training))  # a new module keeps the model's mode
            for name in names:
                setattr(self, name, None)

    def unfuse_projections(self) -> None:
        for fused_name, names in self.fusions.items():
            fused = getattr(self, fused_name)
            if fused is None:
                continue
            with torch.no_grad():
                for name, weight in zip(names, fused.weight.chunk(len(names))):
                    part = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
                    part.weight = nn.Parameter(weight.clone(), fused.weight.requires_grad)
                    setattr(self, name, part.train(fused.training))
            setattr(self, fused_name, None)


def _state_dict_with_parts(module: FusedProjections, state_dict, prefix, local_metadata) -> None:
    """State-dict hook: a fused weight is saved as its parts (own storage each), under the parts' names."""
    for fused_name, names in module.fusions.items():
        weight = state_dict.pop(f"{prefix}{fused_name}.weight", None)
        if weight is not None:
            for name, part in zip(names, weight.chunk(len(names))):
                state_dict[f"{prefix}{name}.weight"] = part.clone()


def _load_parts_into_fused(module: FusedProjections, state_dict, prefix, *args) -> None:
    """Load hook: parts given under their own names load into the fused weight when the module is fused."""
    for fused_name, names in module.fusions.items():
        keys = [f"{prefix}{name}.weight" for name in names]
        if getattr(module, fused_name) is not None and all(key in state_dict for key in keys):
            state_dict[f"{prefix}{fused_name}.weight"] = torch.cat([state_dict.pop(key) for key in keys])
