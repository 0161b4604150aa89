"""The key statistics an :class:`~blue_plugin.editing.editor.Editor` edits with: C0 per layer and
AlphaEdit's null-space projector P, cached in the edit state.

C0 comes from the state, else from the statistics cache, else it is computed
(:func:`blue_plugin.stats.moments.get_second_moments`). A rule that needs only the projector
(AlphaEdit: ``needs_projector`` and not ``needs_c0``) may instead use a projection imported from
AlphaEdit's ``null_space_project.pt`` (:mod:`blue_plugin.stats.projection`): when the state has
neither the layer's projector nor its C0 and the cache has no C0 file for the request, an
imported P for the same statistics settings and ``nullspace_threshold`` is put into the state as
the projector, and C0 is not computed. Anything that then asks for C0 itself (another base
method on the same state, an analysis) gets a :class:`~blue_plugin.errors.BLUEStatisticsError`
saying to import the ``layer_stats`` file or compute the statistics.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from ..errors import BLUEStatisticsError
from ..model.loading import default_cache_dir
from ..stats.moments import get_second_moments
from ..stats.projection import cached_statistics
from .rules import null_space_projector

logger = logging.getLogger(__name__)


class EditStatistics:
    """C0 and projectors of ``editor``'s layers (read through ``editor.hp``, ``editor.state``,
    ``editor.layout``, ``editor.weight`` and ``editor.solve_dtype`` at every call)."""

    def __init__(self, editor):
        self.editor = editor

    def c0_key(self, layer: int) -> tuple:
        """Key of ``layer``'s C0 in ``state.second_moments`` (layer and the statistics settings)."""
        hp = self.editor.hp
        return (layer, hp.mom2_dataset, hp.mom2_n_samples, hp.mom2_max_length, hp.mom2_dtype, hp.mom2_adjustment)

    def projector_key(self, layer: int) -> tuple:
        """Key of ``layer``'s projector in ``state.projectors`` (:meth:`c0_key` and the threshold)."""
        return self.c0_key(layer) + (self.editor.hp.nullspace_threshold,)

    def only_projector(self, layer: int) -> bool:
        """Whether the state has ``layer``'s projector but not its C0 (an imported projection)."""
        state = self.editor.state
        return self.c0_key(layer) not in state.second_moments and self.projector_key(layer) in state.projectors

    def loaded(self, layer: int) -> bool:
        """Whether the state holds what the editor's rule needs for ``layer``: C0, or for a rule
        that needs only the projector, C0 or the projector."""
        if self.c0_key(layer) in self.editor.state.second_moments:
            return True
        rule = self.editor.rule
        return not rule.needs_c0 and rule.needs_projector and self.projector_key(layer) in self.editor.state.projectors

    def ensure(self, layers: Sequence[int], progress: bool = True) -> list[int]:
        """Load (or compute, in one pass) the statistics the rule needs for ``layers`` into the
        state (see the module docstring); returns the layers that were not loaded yet."""
        ed = self.editor
        hp, state = ed.hp, ed.state
        missing = [l for l in dict.fromkeys(layers) if not self.loaded(l)]
        if not missing:
            return missing
        if not hp.mom2_adjustment:
            for l in missing:
                d_in = ed.W(l).shape[1]
                state.second_moments[self.c0_key(l)] = torch.eye(d_in, dtype=ed.solve_dtype, device=ed.weight(l).device)
            return missing
        if any(ls.post_fp is not None for ls in state.layers.values()):
            logger.warning("loading key statistics after edits were made: if they are not cached yet they are computed on the edited model")
        names = {l: ed.layout.rewrite(l) for l in missing}
        cache_dir = hp.stats_dir if hp.stats_dir is not None else default_cache_dir() / "stats"
        model_id = str(getattr(ed.model.config, "_name_or_path", None) or hp.model_name)
        settings = dict(corpus=hp.mom2_dataset, n_samples=hp.mom2_n_samples, max_length=hp.mom2_max_length,
                        mom2_dtype=hp.mom2_dtype, cache_dir=cache_dir, model_id=model_id, progress=progress)
        todo = missing
        if not ed.rule.needs_c0 and ed.rule.needs_projector:
            moments, projections = cached_statistics(ed.model, ed.tok, list(names.values()),
                                                     threshold=hp.nullspace_threshold, **settings)
            for l in missing:
                if names[l] in moments:
                    self.store_c0(l, moments[names[l]])
                elif names[l] in projections:
                    self.store_projector(l, projections[names[l]], imported=True)
            todo = [l for l in missing if not self.loaded(l)]
        if todo:
            moments = get_second_moments(ed.model, ed.tok, [names[l] for l in todo], **settings)
            for l in todo:
                self.store_c0(l, moments[names[l]])
        return missing

    def store_c0(self, layer: int, C0: torch.Tensor) -> None:
        """Put ``C0`` into the state (solve dtype, on the layer's device)."""
        ed = self.editor
        ed.state.second_moments[self.c0_key(layer)] = C0.to(device=ed.weight(layer).device, dtype=ed.solve_dtype)

    def store_projector(self, layer: int, P: torch.Tensor, rank: int | None = None, imported: bool = False) -> None:
        """Put the projector ``P`` into the state (solve dtype, on the layer's device), with its
        ``rank`` (default: its trace, rounded)."""
        ed = self.editor
        P = P.to(device=ed.weight(layer).device, dtype=ed.solve_dtype)
        rank = int(round(float(P.diagonal().sum()))) if rank is None else rank
        thr = ed.hp.nullspace_threshold
        logger.info("AlphaEdit layer %d: %snull space of C0 has dimension %d of %d (threshold %g)", layer,
                    "imported projection: " if imported else "", rank, P.shape[0], thr)
        if rank == 0:
            logger.warning("layer %d: the null space is empty at threshold %g; AlphaEdit cannot change this layer", layer, thr)
        ed.state.projectors[self.projector_key(layer)] = (P, rank)

    def C0(self, layer: int) -> torch.Tensor:
        """``layer``'s C0 from the state; a clear error when only an imported projection is there."""
        C0 = self.editor.state.second_moments.get(self.c0_key(layer))
        if C0 is not None:
            return C0
        if self.only_projector(layer):
            raise BLUEStatisticsError(
                f"layer {layer}: C0 itself is needed here, but only AlphaEdit's null-space projection P is loaded "
                "(imported from a null_space_project.pt; C0 cannot be recovered from it). Import the layer_stats "
                f"file P was computed from (python -m blue_plugin.stats import FILE.npz --hparams H --layer {layer}) "
                "or compute the statistics (python -m blue_plugin.stats --hparams H).", "c0")
        raise KeyError(f"C0 of layer {layer} is not loaded (call ensure_second_moments first)")

    def projector(self, layer: int) -> torch.Tensor:
        """``layer``'s null-space projector: from the state, else derived from C0 and cached."""
        key = self.projector_key(layer)
        if key not in self.editor.state.projectors:
            P, rank = null_space_projector(self.C0(layer), self.editor.hp.nullspace_threshold)
            self.store_projector(layer, P, rank)
        return self.editor.state.projectors[key][0]
