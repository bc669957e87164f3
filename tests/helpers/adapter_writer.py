"""Fork server for test_adapter_dir_concurrency.py: imports MindSpore and mindpet once, then forks processes that
save adapters into one directory with ``PetModel.save_pretrained`` in a loop, until they are killed.

Protocol (one line per message). stdin: ``loop DIR WRITER START [FORMAT]`` (FORMAT: ``save_pretrained``'s, default
'mindpet') -> stdout ``PID <pid>`` (the child then prints ``SAVED <writer> <n>`` after each save); ``wait PID`` ->
``EXIT <status>``; ``quit``.

Save ``n`` of writer ``w`` is recognisable from any of its parts, so a reader can tell a mixed load: the adapter is
named ``w<w>-<n>`` (mindpet's format records the name; PEFT's does not), its ``lora_alpha`` is :func:`alpha`
``(w, n)``, every ``lora_a`` entry is ``n`` and every ``lora_b`` entry is ``w``.
"""
import os
import sys

import numpy as np
import mindspore as ms
from mindspore import Tensor

from mindpet import LoraConfig, get_pet_model

from tests.nets import PlainMLP

TARGETS = ['fc1', 'fc2']


def alpha(writer, n):
    """The ``lora_alpha`` of save ``n`` of ``writer`` (a config field that differs between consecutive saves)."""
    return 10 * writer + n % 7 + 1


def save_version(pet, directory, writer, n, fmt='mindpet'):
    """Add adapter ``w<writer>-<n>``, fill its tensors as the module docstring says, save it in format ``fmt``,
    forget it."""
    name = f'w{writer}-{n}'
    pet.add_adapter(name, LoraConfig(target_modules=TARGETS, lora_rank=2, lora_alpha=alpha(writer, n)))
    pet.set_adapter(name)
    for param in pet.trainable_params():
        value = n if param.name.endswith('lora_a') else writer
        param.set_data(Tensor(np.full(param.shape, value, np.float32)))
    pet.save_pretrained(directory, format=fmt)
    pet.set_adapter('default')
    pet.delete_adapter(name)


def new_pet():
    ms.set_context(mode=ms.PYNATIVE_MODE, device_target='CPU')
    return get_pet_model(PlainMLP(), LoraConfig(target_modules=TARGETS, lora_rank=2))


def identify(adapter):
    """``(writer, n)`` of a loaded StoredAdapter, or an AssertionError saying which parts disagree (a mixed load)."""
    if adapter.name is None:      # PEFT's format: read them from the tensors, which the checks below hold to
        first = adapter.layers[TARGETS[0]]
        writer, n = int(first['mindpet_delta_lora_b'].flat[0]), int(first['mindpet_delta_lora_a'].flat[0])
    else:
        writer, n = (int(part) for part in adapter.name[1:].split('-'))
    assert adapter.config.lora_alpha == alpha(writer, n), (adapter.name, adapter.config.lora_alpha)
    for key in TARGETS:
        assert np.all(adapter.layers[key]['mindpet_delta_lora_a'] == n), (adapter.name, key, 'lora_a')
        assert np.all(adapter.layers[key]['mindpet_delta_lora_b'] == writer), (adapter.name, key, 'lora_b')
    return writer, n


def loop(directory, writer, start, fmt='mindpet'):
    pet = new_pet()
    n = int(start)
    while True:
        save_version(pet, directory, int(writer), n, fmt)
        print(f'SAVED {writer} {n}', flush=True)
        n += 1


def main():
    print('READY', flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == 'quit':
            break
        if words[0] == 'wait':
            _, status = os.waitpid(int(words[1]), 0)
            print(f'EXIT {status}', flush=True)
            continue
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                loop(*words[1:5])
            except BaseException as ex:  # report, then leave without running the parent's cleanup
                print(f'CHILD_ERROR {type(ex).__name__}: {ex}', file=sys.stderr, flush=True)
                code = 1
            os._exit(code)
        print(f'PID {pid}', flush=True)


if __name__ == '__main__':
    main()
