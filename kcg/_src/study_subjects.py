"""Probes, ablations and layer-wise matching of one model (compiled or trained), with their figures.

A thin layer over `kcg.probes`, `kcg.ablations` and `kcg.matching` that runs each analysis the way
the study reports it and returns JSON-ready numbers: `probe_study` (every layer probed for the CG
state after every step, with random-init and shuffled-target controls), `compiled_ablation_table`
(each operation of a compiled construction removed, against the algorithm without it),
`trained_ablation` (each head and layer of a trained model removed) and `matching_study` (which
algorithm and step each layer's read-out matches).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from kcg._src import ablations
from kcg._src import matching
from kcg._src import plotting
from kcg._src import probes


def probe_study(subject: probes.Subject, prompts: Any, key: Any, *, ridge: float, num_steps: int,
                combos: Sequence[tuple[str, str]] | None = None, form: str = "dual",
                feature_map: Callable | None = None, control_seed: int = 0, num_folds: int = 5,
                probe_ridge: float = 1e-6, cosine_threshold: float = 0.9,
                path: str | None = None) -> dict:
  """Probes every layer of `subject` for the CG state at every step `t = 0..num_steps`.

  `combos` are `(quantity, site)` pairs (default: alpha, r, p at the support tokens and at the
  aggregator, w at the aggregator and the queries). Targets: `probes.state_targets` (reference CG with
  `ridge` on `phi(x)`). The control is `random_init_like(subject, control_seed)`.

  Returns per combo the `[L+1, T+1]` grids (cosine, r2, shuffled cosine, control cosine, trivial,
  training rows per varying feature) and, per step t, the best layer and its scores.
  """
  if combos is None:
    combos = (("alpha", "support"), ("r", "support"), ("p", "support"), ("alpha", "aggregator"),
              ("w", "aggregator"), ("w", "query"))
  num_support = prompts.x_support.shape[1]
  num_query = prompts.x_query.shape[1]
  h = np.asarray(probes.residuals(subject, prompts))
  h_control = np.asarray(probes.residuals(probes.random_init_like(subject, control_seed), prompts))
  targets = probes.state_targets(prompts.x_support, prompts.y_support, ridge, num_steps, form=form,
                                 feature_map=feature_map)
  out = {"subject": subject.name, "layer_names": list(subject.layer_names), "combos": {}}
  figure, (axes,) = plotting.new_figure(1, len(combos), panel_size=(3.8, 3.4))
  for ax, (quantity, site) in zip(axes, combos):
    values = np.asarray(getattr(targets, quantity))  # [B, T+1, n]
    per_step = np.stack([probes.site_targets(values[:, t], site, num_query)
                         for t in range(num_steps + 1)])
    grid = probes.probe_grid(probes.site_features(h, site, num_support), per_step, key,
                             control_features_LxBxSxD=probes.site_features(h_control, site, num_support),
                             num_folds=num_folds, ridge=probe_ridge, cosine_threshold=cosine_threshold)
    best_layer = np.argmax(np.nan_to_num(grid.cosine, nan=-2), axis=0)
    steps = np.arange(num_steps + 1)
    out["combos"][f"{quantity}@{site}"] = {
        "cosine": grid.cosine, "r2": grid.r2, "shuffled_cosine": grid.shuffled_cosine,
        "control_cosine": grid.control_cosine, "trivial": grid.trivial,
        "rows_per_feature": grid.rows_per_feature,
        "best_layer": best_layer, "best_cosine": grid.cosine[best_layer, steps],
        "best_r2": grid.r2[best_layer, steps],
        "best_control_cosine": np.nanmax(grid.control_cosine, axis=0),
        "best_shuffled_cosine": np.nanmax(grid.shuffled_cosine, axis=0)}
    layers = np.arange(grid.cosine.shape[0])
    for t in range(1, num_steps + 1):
      style = plotting.line_style(t - 1)
      ax.plot(layers, grid.cosine[:, t], "-", markersize=4, label=f"t={t}", **style)
      ax.plot(layers, grid.control_cosine[:, t], ":", color=style["color"])
    ax.axhline(cosine_threshold, linewidth=0.6, **plotting.REFERENCE)
    ax.set_ylim(-0.2, 1.05)
    ax.set_xlabel("layer")
    ax.set_ylabel("held-out cosine (dotted: random init)")
    ax.set_title(f"{quantity}_t @ {site}", fontsize=8)
    plotting.integer_ticks(ax, "x")
  figure.suptitle(f"probes: {subject.name}", fontsize=9)
  plotting.add_figure_legend(figure, axes)
  plotting.save_figure(figure, path)
  return out


def compiled_ablation_table(compiled: Any, prompts: Any, *, operations: Sequence[str] | None = None,
                            steps: Sequence[int] | None = None, path: str | None = None) -> dict:
  """`ablations.ablate_compiled` for every operation the construction has; a bar chart of match/damage.

  Works for every construction with an ablation table (`ablations.available_operations`): CG in its
  three constructions, PCG, Chebyshev and softmax Route A. `steps` (None: all) are the CG steps at
  which each operation is removed; operations of the init layers (the PCG preconditioner) damage
  every step whatever `steps` is.
  """
  available = ablations.available_operations(compiled.program)
  ops = [op for op in (operations or available) if op in available]
  rows = {}
  for op in ops:
    at = None if op == "preconditioner" else steps
    rep = ablations.ablate_compiled(compiled, op, prompts, steps=at)
    rows[op] = {"removed": rep.ablation.description, "match": rep.match,
                "damage_size": rep.damage_size, "mse_vs_oracle_healthy": rep.mse_healthy,
                "mse_vs_oracle_damaged": rep.mse_damaged}
  figure, ((axes,),) = plotting.new_figure(size=(max(5.0, 0.75 * len(ops) + 2.0), 4.2))
  pos = np.arange(len(ops))
  axes.bar(pos - 0.2, [max(rows[o]["match"], plotting.PLOT_FLOOR) for o in ops], 0.4,
           color=plotting.PALETTE[0], label="match: |damaged model - damaged CG| / |damaged CG|")
  axes.bar(pos + 0.2, [max(rows[o]["damage_size"], plotting.PLOT_FLOOR) for o in ops], 0.4,
           color=plotting.PALETTE[1], hatch="//", label="damage: |damaged - healthy| / |healthy|")
  axes.set_yscale("log")
  axes.set_xticks(pos)
  axes.set_xticklabels(ops, rotation=35, ha="right", fontsize=plotting.LEGEND_FONTSIZE)
  axes.set_xlabel("removed operation")
  axes.set_ylabel("relative difference of the predictions")
  where = "every step" if steps is None else f"steps {list(steps)}"
  figure.suptitle(f"ablations of {compiled.program.name} (t={compiled.num_steps}, at {where})",
                  fontsize=9)
  plotting.add_legend(axes, where="above")
  plotting.save_figure(figure, path)
  return {"construction": compiled.program.name, "steps": None if steps is None else list(steps),
          "operations": rows}


def trained_ablation(subject: probes.Subject, prompts: Any, key: Any, *, ridge: float, max_steps: int,
                     path: str | None = None) -> dict:
  """Every head and every layer of a trained subject removed in turn; the damaged model's best CG/GD step.

  For each removed layer, the damaged predictions are matched (`matching.match_layers` on the final
  output) against CG and GD trajectories: does removing a layer look like one solver step fewer?
  """
  dmap = ablations.degradation_map(subject, prompts)
  trajectories = matching.algorithm_trajectories(prompts, ridge, max_steps, algorithms=("cg", "gd"),
                                                 spaces=("data",))
  healthy = probes.predict_fn(subject)(prompts.x_support, prompts.y_support, prompts.x_query)
  healthy_match = matching.match_layers(healthy[None], prompts, trajectories, key).layers[0]
  layer_matches = []
  for layer in range(subject.num_layers):
    damaged = ablations.degradation(subject, prompts, layers=(layer,)).damaged
    m = matching.match_layers(damaged[None], prompts, trajectories, key).layers[0]
    layer_matches.append({"layer": layer, "best": m.name, "step": m.step,
                          "squared_difference": m.squared_difference})
  figure, (axes,) = plotting.new_figure(1, 2)
  image = axes[0].imshow(np.log10(np.maximum(dmap.head_mse, plotting.PLOT_FLOOR)
                                  / max(dmap.mse_healthy, plotting.PLOT_FLOOR)),
                         aspect="auto", cmap="magma")
  figure.colorbar(image, ax=axes[0], label="log10 (mse damaged / mse healthy)")
  axes[0].set_xlabel("removed head")
  axes[0].set_ylabel("layer")
  axes[0].set_title("remove one head", fontsize=8)
  axes[1].bar(np.arange(subject.num_layers), dmap.layer_mse, color=plotting.PALETTE[0])
  axes[1].axhline(dmap.mse_healthy, linewidth=0.8, label="healthy", **plotting.REFERENCE)
  axes[1].set_yscale("log")
  axes[1].set_xlabel("removed layer")
  axes[1].set_ylabel("test mse (squared units of y)")
  plotting.add_legend(axes[1])
  for ax in axes:
    plotting.integer_ticks(ax, "x")
  plotting.integer_ticks(axes[0], "y")
  figure.suptitle(f"ablations: {subject.name}", fontsize=9)
  plotting.save_figure(figure, path)
  return {"mse_healthy": dmap.mse_healthy, "head_mse": dmap.head_mse, "layer_mse": dmap.layer_mse,
          "head_change": dmap.head_change, "layer_change": dmap.layer_change,
          "healthy_best_match": {"best": healthy_match.name, "step": healthy_match.step,
                                 "squared_difference": healthy_match.squared_difference},
          "layer_removed_best_match": layer_matches}


def matching_study(subject: probes.Subject, prompts: Any, key: Any, *, ridge: float, max_steps: int,
                   readout: str = "logit_lens", fit_prompts: Any = None,
                   feature_map: Callable | None = None, gradients: bool = True,
                   algorithms: Sequence[str] = matching.ALGORITHMS,
                   spaces: Sequence[str] = matching.SPACES, readout_ridge: float = 1e-3,
                   path: str | None = None) -> dict:
  """`matching.match_subject` plus a figure: each candidate's best distance per layer."""
  m = matching.match_subject(subject, prompts, key, ridge=ridge, max_steps=max_steps, readout=readout,
                             fit_prompts=fit_prompts, feature_map=feature_map, gradients=gradients,
                             algorithms=algorithms, spaces=spaces, readout_ridge=readout_ridge)
  figure, ((axes,),) = plotting.new_figure(size=(6.4, 3.9))
  layers = np.arange(len(m.layers))
  for i, (name, dist) in enumerate(m.best_distance.items()):
    axes.semilogy(layers, np.maximum(dist, 1e-33), "-", markersize=4, label=name,
                  **plotting.line_style(i))
  for lm in m.layers:
    axes.annotate(str(lm.step), (lm.layer, max(lm.squared_difference, 1e-33)), fontsize=7)
  axes.set_xlabel("layer (numbers: best-matching step t)")
  axes.set_ylabel("min_t mean (f_layer - f_t)^2 (y^2)")
  axes.set_title(f"layer-wise matching ({readout}): {subject.name}", fontsize=8)
  plotting.integer_ticks(axes, "x")
  plotting.add_legend(axes)
  plotting.save_figure(figure, path)
  return {"subject": subject.name, "readout": readout,
          "layers": [lm._asdict() for lm in m.layers], "best_step": m.best_step,
          "best_distance": m.best_distance, "table": m.table()}

