"""20 GRAPH_MODE training steps with LoRA: loss falls, LoRA weights change, everything else is bit-identical."""
import numpy as np

from mindpet.graph import freeze_delta

from tests.nets import LoRAMLP, regression_data, snapshot, train_steps, grads_of


def test_lora_training_changes_only_lora_params(graph_mode):
    net = LoRAMLP()
    freeze_delta(net, 'lora')
    x, y = regression_data()
    before = snapshot(net)
    # A first gradient: B starts at zero, so only B gets a gradient on step one (A's grad is B^T-weighted).
    grads = grads_of(net, x, y)
    assert set(grads) == {'fc1.mindpet_delta_lora_a', 'fc1.mindpet_delta_lora_b', 'fc2.mindpet_delta_lora_a',
                          'fc2.mindpet_delta_lora_b'}
    assert all(np.abs(g).max() > 0 for name, g in grads.items() if name.endswith('_b'))
    losses = train_steps(net, x, y, steps=20)
    assert losses[-1] < 0.7 * losses[0], losses
    after = snapshot(net)
    for name, value in before.items():
        if 'mindpet_delta_lora' in name:
            assert np.abs(after[name] - value).max() > 1e-4, name
        else:
            np.testing.assert_array_equal(after[name], value, err_msg=name)
    # After training every LoRA tensor receives gradient.
    assert all(np.abs(g).max() > 0 for g in grads_of(net, x, y).values())
