"""Optional: the PEFT-format round trip against Hugging Face PEFT on PyTorch (LoRA, DoRA, IA3), both ways.

Needs a Python with torch and peft, run as a child process: ``$MINDPET_PEFT_PYTHON``, or the benchmark's peer
virtualenv ``.bench/peft`` (made by ``scripts/benchmark.py --peers``). Skipped when neither exists. The PyTorch
network is PlainMLP's twin (``fc1``, ``fc2``, ``head``: Linear layers, the same weights)."""
import json
import os
import subprocess
import textwrap

import numpy as np
import pytest
from mindspore import Tensor
from safetensors.numpy import save_file

from mindpet import IA3Config, LoraConfig, PetModel, get_pet_model

from tests.nets import PlainMLP

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _peft_python():
    for path in (os.environ.get('MINDPET_PEFT_PYTHON'), os.path.join(ROOT, '.bench', 'peft', 'bin', 'python')):
        if path and os.path.isfile(path):
            probe = subprocess.run([path, '-c', 'import torch, peft'], capture_output=True, timeout=300)
            if probe.returncode == 0:
                return path
    return None


PEFT_PYTHON = _peft_python()
pytestmark = pytest.mark.skipif(PEFT_PYTHON is None, reason='no Python with torch and peft '
                                                           '(set MINDPET_PEFT_PYTHON)')

CHILD = textwrap.dedent('''
    import json, sys
    import numpy as np, torch
    from safetensors.numpy import load_file
    import peft

    job = json.load(open(sys.argv[1]))
    torch.manual_seed(0)

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.head = torch.nn.Linear(8, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)
        def forward(self, x):
            return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))

    model = MLP()
    base = load_file(job['base'])
    model.load_state_dict({k: torch.from_numpy(v) for k, v in base.items()})
    if job['direction'] == 'load':
        model = peft.PeftModel.from_pretrained(model, job['dir'])
    else:
        if job['method'] == 'ia3':
            config = peft.IA3Config(target_modules=['fc1', 'fc2'], feedforward_modules=['fc2'])
        else:
            config = peft.LoraConfig(r=2, lora_alpha=6, target_modules=['fc1', 'fc2'],
                                     use_dora=job['method'] == 'dora')
        model = peft.get_peft_model(model, config)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.requires_grad:
                    around = 1.0 if ('ia3' in name or 'magnitude' in name) else 0.0
                    param.copy_(around + 0.5 * torch.randn(param.shape, generator=gen))
        model.save_pretrained(job['dir'])
    model.eval()
    with torch.no_grad():
        out = model(torch.from_numpy(np.load(job['x']))).numpy()
    np.save(job['out'], out)
''')


def _configs():
    return {'lora': LoraConfig(target_modules=['fc1', 'fc2'], lora_rank=2, lora_alpha=6),
            'dora': LoraConfig(target_modules=['fc1', 'fc2'], lora_rank=2, lora_alpha=6, use_dora=True),
            'ia3': IA3Config(target_modules=['fc1', 'fc2'], feedforward_modules=['fc2'])}


def _run_child(tmp_path, direction, method, directory):
    net = PlainMLP()
    base = str(tmp_path / 'base.safetensors')
    save_file({p.name: p.asnumpy() for p in net.get_parameters()}, base)
    x = np.random.RandomState(4).randn(6, 8).astype(np.float32)
    np.save(tmp_path / 'x.npy', x)
    job = dict(direction=direction, method=method, dir=directory, base=base, x=str(tmp_path / 'x.npy'),
               out=str(tmp_path / 'out.npy'))
    (tmp_path / 'job.json').write_text(json.dumps(job))
    (tmp_path / 'child.py').write_text(CHILD)
    done = subprocess.run([PEFT_PYTHON, str(tmp_path / 'child.py'), str(tmp_path / 'job.json')],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return Tensor(x), np.load(tmp_path / 'out.npy')


@pytest.mark.parametrize('method', ['lora', 'dora', 'ia3'])
def test_mindpet_adapter_loads_in_hf_peft_with_same_outputs(method, tmp_path, graph_mode):
    pet = get_pet_model(PlainMLP(), _configs()[method])
    rng = np.random.RandomState(2)
    for param in pet.trainable_params():
        around = 1.0 if ('magnitude' in param.name or 'ia3' in param.name) else 0.0
        param.set_data(Tensor((around + 0.5 * rng.randn(*param.shape)).astype(np.float32)))
    directory = str(tmp_path / 'adapter')
    pet.save_pretrained(directory, format='peft')
    x, torch_out = _run_child(tmp_path, 'load', method, directory)
    ours = pet(x).asnumpy()
    assert np.abs(ours - PlainMLP()(x).asnumpy()).max() > 1e-2
    np.testing.assert_allclose(torch_out, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('method', ['lora', 'dora', 'ia3'])
def test_hf_peft_adapter_loads_in_mindpet_with_same_outputs(method, tmp_path, graph_mode):
    directory = str(tmp_path / 'adapter')
    x, torch_out = _run_child(tmp_path, 'save', method, directory)
    pet = PetModel.from_pretrained(PlainMLP(), directory)
    assert pet.get_adapter_config().method == ('ia3' if method == 'ia3' else 'lora')
    assert np.abs(torch_out - PlainMLP()(x).asnumpy()).max() > 1e-2
    np.testing.assert_allclose(pet(x).asnumpy(), torch_out, rtol=1e-5, atol=1e-5)
