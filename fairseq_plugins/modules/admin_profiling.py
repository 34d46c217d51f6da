"""Profiled Admin (``--admin-init profiled``) for a fairseq model with Admin residuals: a mixin.

The measurement is the library's ([`admin_torch.profile_omegas`][admin_torch.profile_omegas]); this mixin runs it
where fairseq lets a model do so: on the first training forward pass, once per run (a persistent buffer
records it, so a resumed run does not profile again), averaged over the distributed ranks, with the file of
``--admin-profile``.
"""

import logging
import os
from typing import List, Optional

import torch
from torch import nn

import admin_torch

__all__ = ["AdminProfiling"]

# the name its log lines have always had (the model module held this mixin)
logger = logging.getLogger("fairseq_plugins.models.transformer_admin")


class AdminProfiling:
    """Profiled Admin (``--admin-init profiled``) for a fairseq model with Admin residuals.

    The first training forward pass runs once more under ``torch.no_grad()`` to measure each
    sublayer's output variance ([`admin_torch.profile_omegas`][admin_torch.profile_omegas], each stack a separate chain),
    averages the omegas over distributed ranks, writes ``--admin-profile`` and marks the model
    profiled in the persistent buffer ``admin_profiled``.
    """

    def _init_profiling(self, args) -> None:
        if args.admin_init == "profiled":
            # 1 once the omegas are profiled (or loaded); saved with the model, so a resumed run keeps them
            self.register_buffer("admin_profiled", torch.zeros(1))
        # a host-side copy of admin_profiled: reading the buffer every step would sync with the GPU
        self._profiled: Optional[bool] = None

    def _profile_chains(self) -> List[nn.Module]:
        raise NotImplementedError

    def _load_profile_file(self, args) -> None:
        if args.admin_init == "profiled" and args.admin_profile and os.path.exists(args.admin_profile):
            admin_torch.apply_omegas(self, admin_torch.load_profile(args.admin_profile))
            self.admin_profiled.fill_(1)
            logger.info("%s: loaded profiled omegas from %s", type(self).__name__, args.admin_profile)

    def needs_profiling(self) -> bool:
        if self._admin_args().admin_init != "profiled" or not self.training:
            return False
        if self._profiled is None:  # once after construction or a checkpoint load, not per step
            self._profiled = self._all_ranks_profiled()
        return not self._profiled

    def _all_ranks_profiled(self) -> bool:
        """Whether every rank is profiled. With several ranks this is a collective: a restart where
        the profile file exists on only some ranks profiles again on all of them (the profiling
        averages over ranks), instead of leaving the others waiting in that average forever."""
        flag = self.admin_profiled.detach().clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())

    def _admin_args(self):
        return getattr(self, "legacy_args", None) or self.args

    def _load_from_state_dict(self, *args, **kwargs):
        self._profiled = None  # admin_profiled may change: read it again at the next training step
        super()._load_from_state_dict(*args, **kwargs)

    def profile_(self, run_forward) -> dict:
        """Profile the omegas with ``run_forward()`` (one forward pass on real data), average them
        over distributed ranks, write ``--admin-profile`` (rank 0) and mark the model profiled."""
        # profile_omegas averages over the distributed ranks: all ranks train the same model
        omegas = admin_torch.profile_omegas(self, run_forward, chains=self._profile_chains())
        path = self._admin_args().admin_profile
        if path and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
            admin_torch.save_profile(omegas, path)
            logger.info("%s: profiled %d omegas, written to %s", type(self).__name__, len(omegas), path)
        self.admin_profiled.fill_(1)
        self._profiled = True
        return omegas
