"""Serve one tiny model folder with vLLM (greedy) and print its tokens and log-probabilities as JSON.

Run by ``test_vllm_plugin.py`` in a subprocess (vLLM spawns processes and keeps global state, so each
engine gets a fresh interpreter). In-process mode (one process, quicker) unless the case asks for
vLLM's default multiprocess mode; the plugin loads through its ``vllm.general_plugins`` entry point
in both.
"""

import json
import os
import sys


def main() -> None:
    case = json.loads(sys.argv[1])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    in_process = case.get("in_process", True)
    if in_process:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=case["model"],
        dtype="float32",
        max_model_len=128,
        enforce_eager=True,
        seed=0,
        max_num_seqs=4,
        max_num_batched_tokens=256,
        model_impl=case.get("model_impl", "auto"),
        skip_tokenizer_init=True,
        **({"distributed_executor_backend": "uni"} if in_process else {}),
    )
    params = SamplingParams(
        temperature=0.0, max_tokens=case["max_tokens"], logprobs=1, ignore_eos=True, detokenize=False
    )
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in case["prompts"]], params)
    result = []
    for out in outs:
        done = out.outputs[0]
        tokens = list(done.token_ids)
        result.append({"tokens": tokens, "logprobs": [lp[t].logprob for lp, t in zip(done.logprobs, tokens)]})
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
