"""Helpers for the example-model tests: swap Dense layers for LoRADense by hand, train a few steps, snapshot."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, Tensor

from mindpet.delta.lora import LoRADense


@pytest.fixture(scope='module')
def graph():
    """GRAPH_MODE for a whole test module (import it into the module); PYNATIVE_MODE again afterwards."""
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


def swap_dense_for_lora(net, names, rank=4, alpha=8, within=None):
    """Replace every ``nn.Dense`` child whose attribute name is in ``names`` by a LoRADense that holds the same
    weight/bias Parameters (B = 0, so outputs are unchanged); with ``within``, only children of cells whose path
    ends with it. Returns the cell paths swapped.

    A graph compiled before the swap ignores it: run the network through a new top-level Cell afterwards.
    """
    swapped = []
    for path, cell in list(net.cells_and_names()):
        if within is not None and not path.endswith(within):
            continue
        for child_name, child in list(cell.name_cells().items()):
            if child_name in names and type(child) is nn.Dense:  # pylint: disable=unidiomatic-typecheck
                lora = LoRADense(child.in_channels, child.out_channels, lora_rank=rank, lora_alpha=alpha,
                                 compute_dtype=ms.float32, has_bias=child.has_bias,
                                 weight_init=Tensor(child.weight.asnumpy()),
                                 bias_init=Tensor(child.bias.asnumpy()) if child.has_bias else 'zeros')
                # Keep the base Parameter objects (their full names and values) and give the new delta parameters
                # the same path: a Cell set on its parent after construction only gets the attribute name as prefix.
                prefix = child.weight.name[:-len('weight')]
                lora.weight = child.weight
                if child.has_bias:
                    lora.bias = child.bias
                setattr(cell, child_name, lora)
                for param in lora.get_parameters():
                    param.name = prefix + param.name.rsplit('.', 1)[-1]
                swapped.append(f'{path}.{child_name}' if path else child_name)
    return swapped


def snapshot(net):
    """(Parameter, numpy copy) pairs for every parameter (kept by object: names are only compared at the end)."""
    return [(p, p.asnumpy().copy()) for p in net.get_parameters()]


def train_steps(loss_net, batches, learning_rate, params=None):
    """Run one Adam step per batch in the current mode with ``nn.TrainOneStepCell``; returns the losses."""
    params = loss_net.trainable_params() if params is None else params
    step = nn.TrainOneStepCell(loss_net, nn.Adam(params, learning_rate=learning_rate))
    step.set_train()
    losses = [float(step(*batch).asnumpy()) for batch in batches]
    step.set_train(False)
    return losses


def changed_names(snap):
    """Current names of the parameters whose values differ from the snapshot, sorted."""
    return sorted(p.name for p, value in snap if not np.array_equal(p.asnumpy(), value))


def trainable_names(net):
    """Current names of ``net``'s trainable parameters, sorted."""
    return sorted(p.name for p in net.trainable_params())
