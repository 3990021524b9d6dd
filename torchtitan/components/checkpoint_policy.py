"""When the training loop saves: TorchTitan's ``checkpoint.load_only`` and
``checkpoint.enable_first_step_checkpoint`` on top of the checkpoint manager.

The manager (components/checkpoint) decides how a save is written; this subclass only adds
two rules about whether one is: ``load_only`` loads as usual but never saves (every save,
the preemption and non-finite ones included, is skipped), and
``enable_first_step_checkpoint`` also saves right after step 1, to prove early that saving
works on a new cluster or storage.
"""

from __future__ import annotations

from torchtitan.components.checkpoint import CheckpointManager


class PolicyCheckpointManager(CheckpointManager):
    def save(self, step: int, last_step: bool = False, force: bool = False) -> bool:
        if self.settings.load_only:
            return False
        if step == 1 and self.settings.enable_first_step_checkpoint:
            force = True
        return super().save(step, last_step=last_step, force=force)
