"""Tiny networks and training helpers shared by the tests."""
import numpy as np
import mindspore as ms
from mindspore import nn, ops, Tensor

from mindpet.delta import LoRADense


class LoRAMLP(nn.Cell):
    """Two LoRA hidden layers and a plain head, written the MindPet way (LoRADense in the model source)."""

    def __init__(self, in_dim=8, hidden=16, out_dim=4, rank=4, alpha=8, dropout=0.0, seed=0):
        super().__init__()
        np.random.seed(seed)
        self.fc1 = LoRADense(in_dim, hidden, lora_rank=rank, lora_alpha=alpha, lora_dropout=dropout,
                             compute_dtype=ms.float32, weight_init=_w(hidden, in_dim))
        self.act = nn.ReLU()
        self.fc2 = LoRADense(hidden, hidden, lora_rank=rank, lora_alpha=alpha, lora_dropout=dropout,
                             compute_dtype=ms.float32, weight_init=_w(hidden, hidden))
        self.head = nn.Dense(hidden, out_dim, weight_init=_w(out_dim, hidden))

    def construct(self, x):
        return self.head(self.act(self.fc2(self.act(self.fc1(x)))))


class PlainMLP(nn.Cell):
    """The same network with plain Dense layers (the 'base model')."""

    def __init__(self, in_dim=8, hidden=16, out_dim=4, seed=0):
        super().__init__()
        np.random.seed(seed)
        self.fc1 = nn.Dense(in_dim, hidden, weight_init=_w(hidden, in_dim))
        self.act = nn.ReLU()
        self.fc2 = nn.Dense(hidden, hidden, weight_init=_w(hidden, hidden))
        self.head = nn.Dense(hidden, out_dim, weight_init=_w(out_dim, hidden))

    def construct(self, x):
        return self.head(self.act(self.fc2(self.act(self.fc1(x)))))


def _w(out_dim, in_dim):
    return Tensor(np.random.randn(out_dim, in_dim).astype(np.float32) * 0.3)


def regression_data(n=32, in_dim=8, out_dim=4, seed=1):
    rng = np.random.RandomState(seed)
    x = rng.randn(n, in_dim).astype(np.float32)
    y = np.tanh(x @ rng.randn(in_dim, out_dim).astype(np.float32)).astype(np.float32)
    return x, y


def snapshot(net):
    """name -> numpy copy of every parameter."""
    return {p.name: p.asnumpy().copy() for p in net.get_parameters()}


def train_steps(net, x, y, steps=20, lr=0.05):
    """Run ``steps`` training steps (MSE, Adam over trainable params); returns the list of losses."""
    loss_net = nn.WithLossCell(net, nn.MSELoss())
    opt = nn.Adam(net.trainable_params(), learning_rate=lr)
    step = nn.TrainOneStepCell(loss_net, opt)
    step.set_train()
    xt, yt = Tensor(x), Tensor(y)
    losses = [float(step(xt, yt).asnumpy()) for _ in range(steps)]
    net.set_train(False)
    return losses


def grads_of(net, x, y):
    """name -> gradient of the MSE loss w.r.t. each trainable parameter."""
    loss_net = nn.WithLossCell(net, nn.MSELoss())
    params = net.trainable_params()
    grad_fn = ms.value_and_grad(loss_net, None, params)
    _, grads = grad_fn(Tensor(x), Tensor(y))
    return {p.name: g.asnumpy() for p, g in zip(params, grads)}


def relu(x):
    return np.maximum(x, 0)


__all__ = ['LoRAMLP', 'PlainMLP', 'regression_data', 'snapshot', 'train_steps', 'grads_of', 'relu', 'ops']
