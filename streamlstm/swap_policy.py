"""Which states a new model takes over: one rule for a live swap and for a restore.

A model swap (``Engine.swap_model``) and a restore of states another model
made (a restart with a new model, or after a crash in the middle of a swap)
decide by the same function, so that a crash never changes the outcome: a
stream whose state was carried into the new model before the crash is
carried again from its changelog record, one that was reset is reset again.
"""

from __future__ import annotations

from streamlstm.config import ModelConfig

__all__ = ["SWAP_MODES", "SWAP_POLICIES", "model_name", "same_state_layout", "swap_mode"]

#: What a swap does with each stream's state (``Engine.swap_model``).
SWAP_MODES = ("carry", "rewarm", "reset")
#: ``auto``: carry where the new model is a retrain of the same model (the same
#: bundle ``name``, the same cell and layer sizes), else rewarm; ``carry``: carry
#: wherever the cell and sizes allow, else rewarm; ``rewarm``: the new model run
#: over each stream's last ticks (``--history-ticks``; without them it is a reset);
#: ``reset``: every stream starts again from zero state.
SWAP_POLICIES = ("auto", "carry", "rewarm", "reset")


def same_state_layout(old: ModelConfig, new: ModelConfig) -> bool:
    """Whether ``new`` can read a state ``old`` wrote: the same cell, the same layer sizes
    (what ``compatible`` means below; whether it *should* is the policy's question)."""
    return old.cell == new.cell and old.hidden_sizes == new.hidden_sizes


def model_name(model_id: str) -> str:
    """The bundle name in a ``name@digest`` model id (the whole id where it has no ``@``)."""
    name, at, _ = model_id.rpartition("@")
    return name if at else model_id


def swap_mode(policy: str, *, made_by: str, model_id: str, compatible: bool) -> str:
    """What becomes of a state ``made_by`` one model under ``model_id`` (``SWAP_MODES``).

    ``carry`` for the same model, or a state that names none (written before
    states named their model). Otherwise as ``policy`` says (``SWAP_POLICIES``),
    never ``carry`` where the cell or layer sizes differ (``compatible`` false).
    """
    if compatible and (not made_by or made_by == model_id):
        return "carry"
    if policy == "reset":
        return "reset"
    if compatible and (
        policy == "carry" or (policy == "auto" and model_name(made_by) == model_name(model_id))
    ):
        return "carry"
    return "rewarm"
