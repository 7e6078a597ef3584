"""AdamW with linear warm-up, cosine decay, global-norm clipping, masked decay."""

from __future__ import annotations

import jax
import optax

from vlm_jax import rules


def cosine(optim_cfg, total_steps: int, warmup: int) -> optax.Schedule:
    """Linear warm-up to the peak, then cosine decay to the end rate at the last step."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=optim_cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=optim_cfg.lr * optim_cfg.end_lr_fraction,
    )


def warmup_stable_decay(optim_cfg, total_steps: int, warmup: int) -> optax.Schedule:
    """Linear warm-up, the peak held, then a linear decay to the end rate over
    the last ``optim.decay_fraction`` of the steps (WSD: Hu et al. 2024,
    Hägele et al. 2024): the rate stays high for longer than under a cosine."""
    peak, end = optim_cfg.lr, optim_cfg.lr * optim_cfg.end_lr_fraction
    decay = max(1, min(total_steps - warmup, round(optim_cfg.decay_fraction * total_steps)))
    stable_end = max(warmup, total_steps - decay)  # a warm-up as long as the run leaves no decay to do
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, max(warmup, 1)), optax.constant_schedule(peak),
         optax.linear_schedule(peak, end, decay)],
        boundaries=[warmup, stable_end])


SCHEDULES = {  # config.optim.schedule -> (optim config, total steps, warm-up steps) -> schedule
    "cosine": cosine,
    "wsd": warmup_stable_decay,
}


def learning_rate_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    warmup = min(optim_cfg.warmup_steps, total_steps)
    return SCHEDULES[optim_cfg.schedule](optim_cfg, total_steps, warmup)


def decay_mask(params):
    """Decay matrices and embeddings only: biases, norm scales/offsets (rank 1)
    and the scalar temperature and bias (rank 0) are left alone."""
    return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)


def make_optimizer(optim_cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Global-norm clipping, then AdamW; with ``optim.lr_rules`` each rule's
    parameters get the schedule times the rule's multiplier."""
    schedule = learning_rate_schedule(optim_cfg, total_steps)

    def adamw(lr):
        return optax.adamw(lr, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps, mu_dtype=optim_cfg.mu_dtype or None,
                           weight_decay=optim_cfg.weight_decay, mask=decay_mask)

    if not optim_cfg.lr_rules:
        inner = adamw(schedule)
    else:
        transforms = {"base": adamw(schedule)}
        for i, (_, mult) in enumerate(optim_cfg.lr_rules):
            transforms[f"rule{i}"] = adamw(lambda step, m=float(mult): m * schedule(step))
        inner = optax.multi_transform(transforms, lambda params: rules.lr_labels(params, optim_cfg.lr_rules))
    return optax.chain(optax.clip_by_global_norm(optim_cfg.grad_clip), inner), schedule
