"""The importance matrix llama.cpp's low-bit quantizers weight their rounding error with.

For every linear layer of every decoder block, the per-input-column mean of the squared activations that reach
it (what ``llama-imatrix`` collects), taken on the calibration text from the model as it will be exported: after
slicing and refit, so a pruned model's matrix has the pruned widths. It is collected layer by layer on the
calibration stream (one decoder layer onloaded at a time), and named by the GGUF tensor names the export writes.
Like ``llama-imatrix`` by default, the output projection and the embeddings get none.
"""
from __future__ import annotations

import torch

from .export.quantize import ImportanceMatrix

#: the adapter's projection fields -> llama.cpp tensor names (``blk.{i}.<name>.weight``)
GGUF_LINEAR_NAMES = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output",
                     "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}
#: beside a saved pruned model: ``selfprune export`` uses it when it is there
IMATRIX_FILE = "imatrix.gguf"


def describe_calibration(config, origin: str | None = None) -> str:
    """The dataset line recorded in the file (llama-imatrix records the text file's path)."""
    text = f"{config.source}/{config.split} {config.num_samples}x{config.seq_len} tokens, seed {config.seed}"
    return text + (f" ({origin})" if origin else "")


@torch.no_grad()
def collect_imatrix(model, tokenizer, calibration, progress: bool = False) -> ImportanceMatrix:
    """The model's importance matrix on ``calibration`` (a CalibrationConfig), one decoder layer at a time."""
    from tqdm.auto import tqdm

    from .adapters import get_adapter
    from .data import calibration_batch, load_text
    from .reconstruction import CalibrationStream

    adapter = get_adapter(model)
    source = load_text(calibration.source, calibration.split, calibration.data_dir)
    input_ids = calibration_batch(tokenizer, source, calibration.num_samples, calibration.seq_len, calibration.seed)
    stream = CalibrationStream(adapter, input_ids, calibration.batch_size)
    result = ImportanceMatrix(datasets=[describe_calibration(calibration, source.origin)],
                              chunk_size=calibration.seq_len)

    def record(names):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            if x.shape[-1]:
                squares = x.pow(2).sum(0).cpu().numpy()
                for name in names:
                    result.add(name, squares, x.shape[0])
        return hook

    for index, layer in enumerate(tqdm(adapter.layers(), desc="importance matrix", disable=not progress, leave=False)):
        def names(*fields):
            return [f"blk.{index}.{GGUF_LINEAR_NAMES[f]}.weight" for f in fields]

        # q / k / v (and gate / up) read one input: hooked where it enters (Phi-3's fused projections included)
        hooks = [adapter.attention_input(layer).register_forward_pre_hook(record(names("q", "k", "v"))),
                 adapter.attention_linears(layer).o.register_forward_pre_hook(record(names("o"))),
                 adapter.mlp_input(layer).register_forward_pre_hook(record(names("gate", "up"))),
                 adapter.mlp_linears(layer).down.register_forward_pre_hook(record(names("down")))]
        try:
            stream.advance(stream.run(layer, index))
        finally:
            for handle in hooks:
                handle.remove()
    return result
