"""Float64 NumPy references of the losses and their gradients (closed form)."""

import numpy as np


def _softmax(x, axis):
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def _lse(x, axis):
    m = x.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def softmax_loss_and_grads(zi, zt, log_t):
    zi, zt = np.float64(zi), np.float64(zt)
    B = zi.shape[0]
    t = np.exp(np.float64(log_t))
    s = zi @ zt.T
    x = t * s
    d = np.diag(x)
    loss = 0.5 * ((_lse(x, 1) - d).mean() + (_lse(x, 0) - d).mean())
    eye = np.eye(B)
    g = ((_softmax(x, 1) - eye) + (_softmax(x, 0) - eye)) / (2 * B)  # dL/dx
    return loss, {"zimg": t * g @ zt, "ztxt": t * g.T @ zi, "log_t": np.sum(g * x)}


def sigmoid_loss_and_grads(zi, zt, log_t, bias):
    zi, zt = np.float64(zi), np.float64(zt)
    B = zi.shape[0]
    t = np.exp(np.float64(log_t))
    s = zi @ zt.T
    x = t * s + np.float64(bias)
    sign = 2 * np.eye(B) - 1
    loss = np.logaddexp(0, -sign * x).sum() / B
    g = -sign / (1 + np.exp(sign * x)) / B  # d softplus(-l x)/dx = -l sigma(-l x)
    return loss, {"zimg": t * g @ zt, "ztxt": t * g.T @ zi, "log_t": np.sum(g * t * s), "bias": g.sum()}


def unit_rows(rng, B, d):
    z = rng.normal(size=(B, d))
    return z / np.linalg.norm(z, axis=1, keepdims=True)
