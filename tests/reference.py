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


def _masked_infonce_rows(x, pos, excluded):
    """Per-row −log-likelihood averaged over positives and its dL/dx (float64)."""
    xm = np.where(excluded, -np.inf, x)
    lse = _lse(xm, 1)
    cnt = pos.sum(1)
    loss_rows = lse - (pos * x).sum(1) / cnt
    g = np.exp(xm - lse[:, None]) - pos / cnt[:, None]
    return loss_rows, g


def unicl_loss_and_grads(zi, zt, labels, log_t):
    zi, zt = np.float64(zi), np.float64(zt)
    B = zi.shape[0]
    t = np.exp(np.float64(log_t))
    x = t * zi @ zt.T
    pos = (labels[:, None] == labels[None, :]).astype(np.float64)
    none = np.zeros_like(pos, bool)
    lr, gr = _masked_infonce_rows(x, pos, none)
    lc, gc = _masked_infonce_rows(x.T, pos.T, none)
    g = (gr + gc.T) / (2 * B)
    loss = (lr.sum() + lc.sum()) / (2 * B)
    return loss, {"zimg": t * g @ zt, "ztxt": t * g.T @ zi, "log_t": np.sum(g * x)}


def image_infonce_loss_and_grads(z1, z2, log_t):
    u = np.concatenate([np.float64(z1), np.float64(z2)])
    B = z1.shape[0]
    t = np.exp(np.float64(log_t))
    x = t * u @ u.T
    idx = np.arange(2 * B)
    pos = (idx[:, None] % B == idx[None, :] % B) & (idx[:, None] != idx[None, :])
    lr, gr = _masked_infonce_rows(x, pos.astype(np.float64), np.eye(2 * B, dtype=bool))
    g = gr / (2 * B)
    du = t * (g + g.T) @ u
    return lr.sum() / (2 * B), {"z1": du[:B], "z2": du[B:], "log_t": np.sum(g * x)}


def filip_loss_and_grads(img, txt, mask, log_t):
    img, txt, mask = np.float64(img), np.float64(txt), np.float64(mask)
    B, ni, _ = img.shape
    t = np.exp(np.float64(log_t))
    s = np.einsum("akd,crd->ackr", img, txt)
    valid = mask[None, :, None, :] > 0
    s_i = np.where(valid, s, -np.inf)
    arg_r = s_i.argmax(3)  # (a, c, k): best text token of each image token
    arg_k = s.argmax(2)  # (a, c, r): best image token of each text token
    cnt = mask.sum(1)
    i2t = np.take_along_axis(s, arg_r[..., None], 3)[..., 0].mean(2)
    t2i = (np.take_along_axis(s, arg_k[:, :, None, :], 2)[:, :, 0, :] * mask[None]).sum(2) / cnt[None]
    xr, xc = t * i2t, t * t2i
    eye = np.eye(B)
    none = np.zeros((B, B), bool)
    lr, gr = _masked_infonce_rows(xr, eye, none)
    lc, gc = _masked_infonce_rows(xc.T, eye, none)
    gr, gc = gr / (2 * B), gc.T / (2 * B)  # dL/dxr[a, c], dL/dxc[a, c]
    d_img, d_txt = np.zeros_like(img), np.zeros_like(txt)
    for a in range(B):
        for c in range(B):
            for k in range(ni):  # x_row: each image token's best text token, weight 1/ni
                r = arg_r[a, c, k]
                d_img[a, k] += t * gr[a, c] / ni * txt[c, r]
                d_txt[c, r] += t * gr[a, c] / ni * img[a, k]
            for r in np.nonzero(mask[c])[0]:  # x_col: each valid text token's best image token
                k = arg_k[a, c, r]
                d_img[a, k] += t * gc[a, c] / cnt[c] * txt[c, r]
                d_txt[c, r] += t * gc[a, c] / cnt[c] * img[a, k]
    loss = (lr.sum() + lc.sum()) / (2 * B)
    return loss, {"img": d_img, "txt": d_txt, "log_t": np.sum(gr * xr) + np.sum(gc * xc)}


def caption_loss_and_grads(logits, tokens):
    """Next-token NLL (logits[:, l] predicts tokens[:, l]) averaged over the
    real (non-zero) tokens, and its gradient with respect to the logits."""
    z = np.float64(logits)
    mask = (tokens != 0).astype(np.float64)
    picked = np.take_along_axis(z, tokens[..., None], axis=-1)[..., 0]
    count = mask.sum()
    loss = ((_lse(z, -1) - picked) * mask).sum() / count
    onehot = np.eye(z.shape[-1])[tokens]
    return loss, (_softmax(z, -1) - onehot) * mask[..., None] / count


def hard_negative_draws(sim, log_t, tokens, u):
    """Float64 inverse-CDF draws of ITM's negatives: for each image a caption
    j ∝ exp(t·s_ij), for each caption an image i ∝ exp(t·s_ij), never one
    whose caption equals the row's own; (index, valid) for each direction."""
    same = (tokens[:, None, :] == tokens[None, :, :]).all(-1)
    logits = np.float64(sim) * np.exp(np.float64(log_t))

    def draw(z, excluded, uu):
        idx, ok = np.zeros(len(z), np.int64), np.zeros(len(z), bool)
        for i in range(len(z)):
            allowed = ~excluded[i]
            if not allowed.any():
                continue
            w = np.where(allowed, np.exp(z[i] - z[i][allowed].max()), 0.0)
            cdf = np.cumsum(w)
            idx[i], ok[i] = min(int(np.sum(cdf <= uu[i] * cdf[-1])), np.flatnonzero(allowed)[-1]), True
        return idx, ok

    return draw(logits, same, np.float64(u[:, 0])), draw(logits.T, same.T, np.float64(u[:, 1]))


def itm_bilinear_loss_and_grads(sim, log_t, tokens, u, img_feats, txt_feats, w):
    """L_ITM with pair logits (0, a_i·W·c_j), a the mean image token, c the
    mean real text token; value and gradients for (img_feats, txt_feats, W)."""
    (neg_t, ok_t), (neg_i, ok_i) = hard_negative_draws(sim, log_t, tokens, u)
    b = len(sim)
    rows = np.arange(b)
    img_idx = np.concatenate([rows, rows, neg_i])
    txt_idx = np.concatenate([rows, neg_t, rows])
    y = np.concatenate([np.ones(b), np.zeros(2 * b)])
    v = np.concatenate([np.ones(b, bool), ok_t, ok_i]).astype(np.float64)
    mask = (tokens != 0).astype(np.float64)
    a = np.float64(img_feats).mean(1)
    c = (np.float64(txt_feats) * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    w = np.float64(w)
    s = np.einsum("pd,de,pe->p", a[img_idx], w, c[txt_idx])
    count = v.sum()
    loss = (v * np.logaddexp(0.0, np.where(y == 1, -s, s))).sum() / count
    ds = v * (1.0 / (1.0 + np.exp(-s)) - y) / count
    da, dc = np.zeros_like(a), np.zeros_like(c)
    np.add.at(da, img_idx, ds[:, None] * (c[txt_idx] @ w.T))
    np.add.at(dc, txt_idx, ds[:, None] * (a[img_idx] @ w))
    dw = np.einsum("p,pd,pe->de", ds, a[img_idx], c[txt_idx])
    d_img = np.repeat(da[:, None, :] / img_feats.shape[1], img_feats.shape[1], axis=1)
    d_txt = dc[:, None, :] * mask[..., None] / mask.sum(1)[:, None, None]
    return loss, (d_img, d_txt, dw), (neg_t, ok_t, neg_i, ok_i)


def mae_loss_and_grads(pred, images, dropped, patch, eps=1e-6):
    """MAE's loss: mean over dropped patches of the mean squared error to the
    per-patch-normalised pixels, in float64, and its gradient in ``pred``."""
    x = np.float64(images)
    b, h, w, c = x.shape
    g = h // patch
    patches = x[:, :g * patch, :g * patch].reshape(b, g, patch, g, patch, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, g * g, -1)
    target = (patches - patches.mean(-1, keepdims=True)) / np.sqrt(patches.var(-1, keepdims=True) + eps)
    m = np.float64(dropped)
    diff = np.float64(pred) - target
    count = m.sum()
    loss = (np.mean(diff ** 2, axis=-1) * m).sum() / count
    return loss, 2 * diff / diff.shape[-1] * m[..., None] / count


def region_word_loss_and_grads(regions, rkeys, rw, phrases, pkeys, pw, log_t, bias):
    """Keyed sigmoid over all B·R regions × B·P phrases, weighted, divided by Σ w_region (float64)."""
    d = regions.shape[-1]
    zr, zp = np.float64(regions).reshape(-1, d), np.float64(phrases).reshape(-1, d)
    kr, kp = np.asarray(rkeys).reshape(-1), np.asarray(pkeys).reshape(-1)
    wr, wp = np.float64(rw).reshape(-1), np.float64(pw).reshape(-1)
    t = np.exp(np.float64(log_t))
    s = zr @ zp.T
    x = t * s + np.float64(bias)
    sign = np.where(kr[:, None] == kp[None, :], 1.0, -1.0)
    w = wr[:, None] * wp[None, :]
    count = max(wr.sum(), 1.0)
    loss = (w * np.logaddexp(0, -sign * x)).sum() / count
    g = -w * sign / (1 + np.exp(sign * x)) / count
    return loss, {"regions": (t * g @ zp).reshape(regions.shape), "phrases": (t * g.T @ zr).reshape(phrases.shape),
                  "log_t": np.sum(g * t * s), "bias": g.sum()}


def weighted_softmax_loss_and_grads(zi, zt, w, log_t):
    """CLIP with pair weights: log Σ_j w_j exp(x_ij) − x_ii, terms weighted by w_i, over 2 Σ w (float64)."""
    zi, zt, w = np.float64(zi), np.float64(zt), np.float64(w)
    t = np.exp(np.float64(log_t))
    s = zi @ zt.T
    x = t * s
    logw = np.log(np.where(w > 0, w, 1.0)) + np.where(w > 0, 0.0, -np.inf)
    total = 2 * w.sum()
    lse_r, lse_c = _lse(x + logw[None, :], 1), _lse(x + logw[:, None], 0)
    keep = w > 0
    diag = np.diagonal(x)
    loss = (np.where(keep, w * (lse_r - diag), 0).sum() + np.where(keep, w * (lse_c - diag), 0).sum()) / total
    p_r = np.exp(x + logw[None, :] - lse_r[:, None])  # rows: softmax over weighted columns
    p_c = np.exp(x + logw[:, None] - lse_c[None, :])  # columns: softmax over weighted rows
    eye = np.eye(len(w))
    g = (np.where(keep[:, None], w[:, None] * (p_r - eye), 0) + np.where(keep[None, :], w[None, :] * (p_c - eye), 0)) / total
    return loss, {"zimg": t * g @ zt, "ztxt": t * g.T @ zi, "log_t": np.sum(g * x)}


def negclip_loss_and_grads(zi, zt, zn, valid, log_t):
    """CLIP with one hard-negative caption per pair: the valid negatives are
    extra columns of the image→text softmax only (closed form, float64)."""
    zi, zt, zn = np.float64(zi), np.float64(zt), np.float64(zn)
    B = zi.shape[0]
    t = np.exp(np.float64(log_t))
    x, xn = t * zi @ zt.T, t * zi @ zn.T
    xn = np.where(np.asarray(valid, bool)[None, :], xn, -np.inf)
    d = np.diag(x)
    both = np.concatenate([x, xn], axis=1)
    loss = 0.5 * ((_lse(both, 1) - d).mean() + (_lse(x, 0) - d).mean())
    p = _softmax(both, 1)
    eye = np.eye(B)
    g = ((p[:, :B] - eye) + (_softmax(x, 0) - eye)) / (2 * B)  # dL/dx
    gn = p[:, B:] / (2 * B)  # dL/dxn (0 where invalid)
    return loss, {"zimg": t * (g @ zt + gn @ zn), "ztxt": t * g.T @ zi, "znegative": t * gn.T @ zi,
                  "log_t": np.sum(g * x) + np.sum(np.where(gn > 0, gn * xn, 0.0))}
