"""The VQAScore reward on the transformers backend: parity, the wire, questions, bad input.

Tiny random-weight LLaVA, PaliGemma, Qwen2-VL, Qwen2.5-VL and a text Llama are saved once per
session (``helpers.vlm_models``) and loaded through ``VLMAdapter.load``; served ones run on real
gRPC hosts on 127.0.0.1, port 0, and are called through the kernel's ``RemoteExpert``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import grpc
import pytest
import torch
import transformers
from helpers import vlm_models as fx
from helpers.remote import LoopThread
from helpers.server import rpc_error, run, running, tensor
from helpers.timing import scaled
from hypothesis import given
from hypothesis import strategies as st

from poegen.expert_servers.server.adapter import Condition, ModelRef
from poegen.expert_servers.vlm import VQASCORE_TEMPLATE, VLMAdapter
from poegen.expert_servers.vlm.questions import Question, parse_condition, parse_questions
from poegen.expert_servers.vlm.reward import frame_indices
from poegen.kernel.errors import ExpertError
from poegen.kernel.experts import ExpertKind
from poegen.kernel.refusal import Code
from poegen.kernel.remote import RemoteExpert
from poegen.v1 import expert_pb2 as pb

FAMILIES = {
    "llava": fx.save_llava,
    "paligemma": fx.save_paligemma,
    "qwen2_vl": lambda p: fx.save_qwen2_vl(p, version="2"),
    "qwen2_5_vl": lambda p: fx.save_qwen2_vl(p, version="2.5"),
    "text": fx.save_text_llm,
}
QUESTIONS = json.dumps(
    [
        {"prompt": "a red cat", "weight": 2.0},
        {"question": "Is it blue? Answer yes or no.", "weight": -0.5},
    ]
)


@pytest.fixture(scope="session")
def vlm_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vlms")
    for name, save in FAMILIES.items():
        save(root / name)
    return root


def load(root: Path, name: str, **options: str):
    return VLMAdapter().load(ModelRef(name, root / name), options, lambda f, m: None)


class _NoVideoProcessor:
    """transformers' own Qwen-VL processor without its video half: the video processor needs
    torchvision, which cannot sit beside the CPU torch here; images never reach it."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


class _Qwen2VLProcessor(_NoVideoProcessor, transformers.Qwen2VLProcessor):
    pass


class _Qwen25VLProcessor(_NoVideoProcessor, transformers.Qwen2_5_VLProcessor):
    pass


def qwen_processor(folder: Path, family: str):
    """The HF processor of a saved Qwen folder, built from its tokenizer, image processor and
    chat template (the adapter builds its inputs by hand instead)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    images = transformers.Qwen2VLImageProcessorPil.from_pretrained(folder)
    cls = _Qwen2VLProcessor if family == "qwen2_vl" else _Qwen25VLProcessor
    return cls(image_processor=images, tokenizer=tokenizer, video_processor=None,
               chat_template=tokenizer.chat_template)  # fmt: skip


def direct_log_yes(judge, images, question: str, folder: Path) -> torch.Tensor:
    """log Σ_{yes} softmax(logits at the last prompt position), from the model's own forward
    on inputs the transformers processor or tokenizer builds (``folder``: the saved model)."""
    yes, _ = fx.yes_no_ids(judge.tokenizer)
    match judge.family:
        case "llava":
            prompt = f"USER: <image>\n{question} ASSISTANT:"
            inputs = judge.processor(
                text=[prompt] * len(images), images=images, return_tensors="pt"
            )
        case "paligemma":
            inputs = judge.processor(
                text=["<image>" + question] * len(images), images=images, return_tensors="pt"
            )
            inputs.pop("labels", None)
        case "text":
            prompt = judge.tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
            )
            inputs = judge.tokenizer(
                [prompt] * len(images), return_tensors="pt", add_special_tokens=False
            )
        case _:  # Qwen: the processor renders the chat template and expands <|image_pad|>
            processor = qwen_processor(folder, judge.family)
            turn = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": question}]}]  # fmt: skip
            prompt = processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
            inputs = processor(text=[prompt] * len(images), images=images, return_tensors="pt")
    with torch.no_grad():
        logits = judge.model(**inputs).logits[:, -1]
    return logits.double().softmax(-1)[:, yes].sum(-1).log()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_served_score_equals_direct_softmax(vlm_root: Path, family: str) -> None:
    served = load(vlm_root, family, max_batch="2")
    judge = served.expert.judge
    pixels = fx.random_images(3, seed=1)
    from poegen.expert_servers.vlm.reward import to_images

    images = to_images(pixels, [])
    q1 = VQASCORE_TEMPLATE.format(text="a red cat")
    q2 = "Is it blue? Answer yes or no."
    # the same chunks as the server (max_batch=2): rows see the same batch, bit for bit
    chunks = [images[:2], images[2:]]
    want = sum(
        w * torch.cat([direct_log_yes(judge, c, q, vlm_root / family) for c in chunks])
        for w, q in ((2.0, q1), (-0.5, q2))
    )
    loop = LoopThread()
    try:
        address = loop.serve(served).address
        with RemoteExpert.connect(address, condition=QUESTIONS) as reward:
            info = reward.describe()
            got = reward.log_potential(pixels)
    finally:
        loop.close()
    assert info.kind == ExpertKind.DISCRIMINATIVE and info.pixel_input
    assert got.dtype == torch.float32
    assert torch.equal(got, want.float()), (got, want)


def test_qwen_image_pads(vlm_root: Path) -> None:
    judge = load(vlm_root, "qwen2_vl").expert.judge
    from poegen.expert_servers.vlm.reward import to_images

    images = to_images(fx.random_images(2, size=56), [])
    inputs = judge.inputs(images, "Q?")
    pad = judge.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    count = int(inputs["image_grid_thw"][0].prod()) // 4
    assert ((inputs["input_ids"] == pad).sum(1) == count).all()
    assert torch.equal(inputs["mm_token_type_ids"], (inputs["input_ids"] == pad).long())
    # what transformers' own processor builds from the folder, key for key
    processor = qwen_processor(vlm_root / "qwen2_vl", "qwen2_vl")
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}]
    text = processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    want = processor(text=[text] * 2, images=images, return_tensors="pt")
    assert set(inputs) == set(want) and all(torch.equal(inputs[k], want[k]) for k in want)


def test_normalized_score_and_video_frames(vlm_root: Path) -> None:
    reward = load(vlm_root, "llava", frames="2", score="yes_no").expert
    view = reward.prepare(Condition(text="a dog"))
    video = fx.random_images(2, frames=5, seed=3)  # (2, 3, 5, 64, 64)
    got = view.log_potential(video)
    from poegen.expert_servers.vlm import scoring
    from poegen.expert_servers.vlm.reward import to_images

    assert frame_indices(video, 2) == [0, 4]
    q = VQASCORE_TEMPLATE.format(text="a dog")
    frames = [to_images(video[:, :, f], []) for f in (0, 4)]
    per_frame = [scoring.score(*reward.judge.answer(imgs, q), normalize=True) for imgs in frames]
    assert torch.allclose(got, (per_frame[0] + per_frame[1]) / 2, atol=1e-12)
    assert (got < 0).all() and (got > math.log(1e-6)).all()
    # a handle may switch to log P(Yes) and to one frame
    plain = reward.prepare(Condition(text="a dog", scalars={"normalize": 0.0, "frames": 1.0}))
    assert plain.query.frames == 1 and not plain.query.normalize
    assert torch.allclose(
        plain.log_potential(video),
        scoring.score(*reward.judge.answer(frames[0], q), normalize=False),
        atol=1e-12,
    )


def test_grey_images_and_batches_chunked(vlm_root: Path) -> None:
    reward = load(vlm_root, "paligemma", max_batch="3").expert
    view = reward.prepare(Condition(text="Is it grey? Please answer Yes or No."))
    grey = fx.random_images(7, seed=4)[:, :1]
    calls: list[int] = []
    answer = reward.judge.answer

    def counted(images, question):
        calls.append(len(images))
        return answer(images, question)

    reward.judge.answer = counted
    out = view.log_potential(grey)
    assert out.shape == (7,) and calls == [3, 3, 1]


# ------------------------------------------------------------------ questions


def test_plain_prompt_uses_the_vqascore_template() -> None:
    assert parse_questions("  a red cat ") == (
        Question('Does this figure show "a red cat"? Please answer Yes or No.'),
    )


def test_json_questions_with_weights() -> None:
    text = json.dumps(["Is it red?", {"prompt": "a cat", "weight": 0.25}, {"question": "Q?"}])
    assert parse_questions(text) == (
        Question("Is it red?"),
        Question(VQASCORE_TEMPLATE.format(text="a cat"), 0.25),
        Question("Q?"),
    )


@pytest.mark.parametrize(
    ("condition", "field"),
    [
        (Condition(text="   "), "condition.text"),
        (Condition(text="[]"), "condition.text"),
        (Condition(text="[1"), "condition.text"),
        (Condition(text='[{"question": ""}]'), "condition.text[0].question"),
        (Condition(text='["ok", {"prompt": "x", "weight": "2"}]'), "condition.text[1].weight"),
        (Condition(text='[{"prompt": "x", "question": "y"}]'), "condition.text[0]"),
        (Condition(text='[{"promt": "x"}]'), "condition.text[0].promt"),
        (Condition(text="x", scalars={"frames": 0.0}), "condition.scalars[frames]"),
        (Condition(text="x", scalars={"normalize": 0.5}), "condition.scalars[normalize]"),
        (Condition(text="x", scalars={"temperature": 1.0}), "condition.scalars[temperature]"),
        (Condition(text="x", tensors={"mask": torch.ones(1)}), "condition.tensors[mask]"),
    ],
)
def test_bad_conditions_name_the_field(condition: Condition, field: str) -> None:
    with pytest.raises(ExpertError) as err:
        parse_condition(condition, normalize=False, frames=8)
    assert err.value.code == Code.INVALID_ARGUMENT
    assert err.value.field == field


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"max_batch": "0"}, "options[max_batch]"),
        ({"score": "maybe"}, "options[score]"),
        ({"dtype": "float8"}, "options[dtype]"),
        ({"family": "clip"}, "options[family]"),
        ({"temperature": "1"}, "options[temperature]"),
    ],
)
def test_bad_options_name_the_option(vlm_root: Path, options: dict, field: str) -> None:
    with pytest.raises(ExpertError) as err:
        load(vlm_root, "llava", **options)
    assert err.value.field == field


def test_a_pickled_checkpoint_is_refused(tmp_path: Path) -> None:
    """The same text model with its weights in pytorch_model.bin (written here only to be
    refused): the loader never falls back to a pickle."""
    folder = tmp_path / "pickled"
    fx.save_text_llm(folder)
    from transformers import AutoModelForCausalLM

    state = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(ExpertError) as err:
        VLMAdapter().load(ModelRef("pickled", folder), {}, lambda f, m: None)
    assert err.value.field == "model_id" and "safetensors" in err.value.reason
    assert str(tmp_path) not in str(err.value)


# ------------------------------------------------------------------ bad input over gRPC


def test_bad_input_over_grpc_and_the_server_keeps_serving(vlm_root: Path) -> None:
    served = load(vlm_root, "llava")

    async def body() -> None:
        async with running(expert=served) as r:
            stub = r.stub
            handle = (
                await stub.Prepare(pb.PrepareRequest(condition=pb.Condition(text="a cat")))
            ).handle
            good = fx.random_images(2).tolist()

            async def log_prob(x, handle=handle):
                return await stub.LogProb(pb.LogProbRequest(x=tensor(x), handle=handle))

            cases = [
                (
                    log_prob(torch.rand(2, 3, 64).tolist()),
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "x.shape",
                ),
                (
                    log_prob(torch.rand(2, 4, 8, 8).tolist()),
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "x.shape",
                ),
                (
                    log_prob((fx.random_images(2) * 2 - 1).tolist()),
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "x",
                ),
                (log_prob(good, "no-such-handle"), grpc.StatusCode.NOT_FOUND, "handle"),
                (log_prob(good, ""), grpc.StatusCode.FAILED_PRECONDITION, "handle"),
                (
                    stub.Prepare(pb.PrepareRequest(condition=pb.Condition(text=""))),
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "condition.text",
                ),
                (
                    stub.Prepare(
                        pb.PrepareRequest(condition=pb.Condition(text='[{"question": " "}]'))
                    ),
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "condition.text[0].question",
                ),
            ]
            for call, code, field in cases:
                got_code, err = await rpc_error(call)
                assert got_code == code and err is not None and err.field == field, (field, err)
            reply = await log_prob(good)
            assert len(reply.log_prob.shape) == 1 and reply.log_prob.shape[0] == 2
            described = await stub.Describe(pb.DescribeRequest())
            assert described.pixel_input and described.kind == pb.EXPERT_KIND_DISCRIMINATIVE

    run(body(), timeout=scaled(60))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_bfloat16_weights_score_close_to_float32(vlm_root: Path, family: str) -> None:
    pixels = fx.random_images(2, seed=5)
    scores = [
        load(vlm_root, family, **options)
        .expert.prepare(Condition(text="a cat"))
        .log_potential(pixels)
        for options in ({}, {"dtype": "bfloat16"})
    ]
    assert (scores[0] - scores[1]).abs().max() < 0.05


def test_a_chat_template_renders_the_prompt(vlm_root: Path, tmp_path: Path) -> None:
    templated = fx.save_llava(tmp_path / "llava", chat_template=fx.LLAVA_TEMPLATE)
    with_template = VLMAdapter().load(ModelRef("t", templated), {}, lambda f, m: None).expert
    without = load(vlm_root, "llava").expert
    assert with_template.judge.prompt("Q?") == "USER: <image>\nQ? ASSISTANT:"
    pixels = fx.random_images(2, seed=6)
    scores = [
        r.prepare(Condition(text="a cat")).log_potential(pixels) for r in (with_template, without)
    ]
    assert torch.equal(scores[0], scores[1])


@given(
    st.lists(st.floats(-20, 5), min_size=6, max_size=40),
    st.integers(1, 40),
    st.integers(0, 2**32 - 1),
)
def test_top_k_bound_never_exceeds_the_exact_probability(logits, k, seed) -> None:
    from poegen.expert_servers.vlm import scoring

    g = torch.Generator().manual_seed(seed)
    log_p = torch.tensor(logits, dtype=torch.float64).log_softmax(0)
    words = ["Yes", " yes", "No", "no.", "maybe", "cat"]
    texts = [words[int(i)] for i in torch.randint(0, 6, (len(logits),), generator=g)]
    exact_yes = log_p[[i for i, t in enumerate(texts) if scoring.answer_word(t) == "yes"]]
    top = log_p.topk(min(k, len(logits)))
    listed = [(texts[int(i)], float(v)) for v, i in zip(top.values, top.indices, strict=True)]
    log_yes, _ = scoring.from_top(listed)
    if any(scoring.answer_word(t) == "yes" for t, _ in listed):
        assert log_yes <= float(exact_yes.logsumexp(0)) + 1e-9
    else:  # none listed: the k-th probability, which bounds every unlisted yes token
        assert log_yes == min(v for _, v in listed)
        assert exact_yes.numel() == 0 or float(exact_yes.max()) <= log_yes + 1e-12
