"""Evaluation runs on the accelerator in the training dtype when there is one (evaluation.device)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from evaluation.device import eval_device, load_causal_lm

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("bf16")
    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return path


def test_auto_picks_cuda_only_when_there_is_one_and_cuda_without_one_is_an_error():
    assert eval_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert eval_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="evaluation.device"):
            eval_device("cuda")


def test_on_cpu_a_bf16_checkpoint_is_evaluated_in_float32(bf16_checkpoint):
    model = load_causal_lm(str(bf16_checkpoint), "cpu")
    assert model.device.type == "cpu" and model.dtype == torch.float32 and not model.training


@pytest.mark.gpu
@needs_cuda
def test_on_a_gpu_the_checkpoint_loads_on_it_in_its_training_dtype(bf16_checkpoint):
    model = load_causal_lm(str(bf16_checkpoint), "auto")
    assert model.device.type == "cuda" and model.dtype == torch.bfloat16
