"""Drop-in modules (same constructor arguments and state_dict as torch.nn's) and convert()."""
from torch import nn

from ._ops import _activation, group_norm, instance_norm


class _InstanceNormMixin:
    # nn's forward keeps its own checks (input rank, num_features) and unbatched handling, and
    # calls this for the normalize itself.
    def _apply_instance_norm(self, x):
        return instance_norm(x, self.weight, self.bias, self.running_mean, self.running_var,
                             self.training or not self.track_running_stats,
                             self.momentum if self.momentum is not None else 0.0, self.eps)


class InstanceNorm1d(_InstanceNormMixin, nn.InstanceNorm1d):
    pass


class InstanceNorm2d(_InstanceNormMixin, nn.InstanceNorm2d):
    pass


class InstanceNorm3d(_InstanceNormMixin, nn.InstanceNorm3d):
    pass


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm, plus activation=None|"relu"|"silu" fused into the same kernel (another
    name raises ValueError here already)."""

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, device=None, dtype=None,
                 activation=None):
        _activation("instnorm_torch.GroupNorm", activation)
        super().__init__(num_groups, num_channels, eps, affine, device, dtype)
        self.activation = activation

    def forward(self, x):
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps, self.activation)

    def extra_repr(self):
        return super().extra_repr() + f", activation={self.activation!r}"


_SWAP = {nn.InstanceNorm1d: InstanceNorm1d, nn.InstanceNorm2d: InstanceNorm2d,
         nn.InstanceNorm3d: InstanceNorm3d}


def _replacement(m):
    if type(m) in _SWAP:
        new = _SWAP[type(m)](m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
    elif type(m) is nn.GroupNorm:
        new = GroupNorm(m.num_groups, m.num_channels, m.eps, m.affine)
    else:
        return None
    ref = next((t for t in list(m.parameters()) + list(m.buffers()) if t.is_floating_point()),
               None)
    if ref is not None:  # same device and dtype (a .half() model stays half)
        new = new.to(device=ref.device, dtype=ref.dtype)
    new.load_state_dict(m.state_dict())
    new.train(m.training)
    return new


def convert(model, fuse_activation=True):
    """Replaces every nn.InstanceNorm1d/2d/3d and nn.GroupNorm of `model` (in place) by the
    instnorm modules, with the same state. With fuse_activation, a GroupNorm directly followed by
    nn.SiLU or nn.ReLU inside an nn.Sequential takes the activation into its kernel (the
    activation module becomes nn.Identity). Returns the model."""
    top = _replacement(model)
    if top is not None:
        return top
    for name, child in list(model.named_children()):
        new = _replacement(child)
        if new is not None:
            setattr(model, name, new)
        else:
            convert(child, fuse_activation)
    if fuse_activation and isinstance(model, nn.Sequential):
        mods = list(model._modules.items())
        for (name, m), (next_name, nxt) in zip(mods, mods[1:]):
            if isinstance(m, GroupNorm) and m.activation is None and type(nxt) in (nn.SiLU, nn.ReLU):
                m.activation = "silu" if type(nxt) is nn.SiLU else "relu"
                model._modules[next_name] = nn.Identity()
    return model
