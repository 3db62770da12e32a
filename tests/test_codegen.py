"""Variant space, rendering and (with nvcc) compile-only checks of generated kernels. No GPU needed."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess

import pytest

from flash_mla.codegen import ptxas
from flash_mla.codegen.render import render
from flash_mla.codegen.variant import (ALL_KNOBS, DTYPES, KNOBS, SMEM_LIMIT, InvalidVariant, Variant, default_variant,
                                       full_space, search_space, variants_by_key)
from flash_mla.constants import CONSUMER_REGS, PRODUCER_REGS


def test_space_is_large_and_valid():
    space = full_space(ALL_KNOBS)
    assert len(space) >= 16
    assert len({v.key for v in space}) == len(space)
    for v in space:
        v.validate()
        assert v.smem_bytes() <= SMEM_LIMIT
    for knob, values in ALL_KNOBS.items():   # every knob keeps >= 2 buildable values
        assert len({getattr(v, knob) for v in space}) >= 2, knob
    assert {v.qk for v in full_space()} == set(KNOBS["qk"]) == {"nsplit", "full_wg", "swap16", "swap32", "qreg"}
    assert {v for v in full_space()} < set(space)


def test_key_is_stable_and_roundtrips():
    v = Variant(dtype="fp16", page_size=32, block_n=32, stages=3, num_warpgroups=4)
    assert v.key == "fp16_p32_n32_s3_w4_o5_c4_msep"
    wide = Variant(**{**v.as_dict(), "merge": "wide_pdl"})
    assert wide.key == "fp16_p32_n32_s3_w4_o5_c4_mwide" and wide.build_key != v.build_key   # merge is compiled in
    assert Variant.from_dict(v.as_dict()) == v
    assert v.digest == Variant(**v.as_dict()).digest
    assert v.build_key == Variant(**{**v.as_dict(), "split_overhead": 2}).build_key
    fewer = Variant(**{**v.as_dict(), "split_min_blocks": 4})
    assert fewer.key == v.key + "_b4" and fewer.build_key == v.build_key        # launch-time knob
    assert fewer.split_policy == (5, 4) and Variant.from_dict(fewer.as_dict()) == fewer
    with pytest.raises(ValueError, match="unknown"):
        Variant.from_dict({"bogus": 1})


@pytest.mark.parametrize("kwargs,why", [
    (dict(block_n=64, stages=3), "shared memory"),
    (dict(block_n=48), "block_n"),
    (dict(num_warpgroups=1), "256 registers"),
    (dict(num_warpgroups=4, block_n=64, stages=1), "regs/thread"),
    (dict(dtype="fp32"), "dtype"),
    (dict(page_size=16), "page_size"),
    (dict(stages=0), "stages"),
    (dict(split_overhead=0), "split_overhead"),
    (dict(split_min_blocks=0), "split_min_blocks"),
    (dict(merge="fused_later"), "merge must be one of"),
    (dict(merge="wide_pdl", combine_rows=8), "combine_rows shapes only the separate merge"),
    (dict(num_warpgroups=3), "qreg and three warpgroups go together"),
    (dict(qk="qreg"), "qreg and three warpgroups go together"),
    (dict(qk="qreg", num_warpgroups=3, block_n=64, stages=3), "shared memory"),
    (dict(qk="qreg", num_warpgroups=3, block_n=32, stages=6), "shared memory"),
    (dict(dtype="bf16_e4m3", qk="qreg", num_warpgroups=3), "cache must be bf16 / fp16"),
    (dict(cluster=2), "qreg and full_wg schedules only"),
    (dict(qk="qreg", num_warpgroups=3, cluster=4), "cluster must be one of"),
    (dict(qk="qreg_ahead", num_warpgroups=3, block_n=64, stages=2), "warpgroup 0 needs 160 regs"),
    (dict(qk="qreg_ahead", num_warpgroups=3, block_n=32, stages=1), "stages must be >= 2"),
    (dict(qk="qreg_ahead"), "qreg_ahead and three warpgroups go together"),
    (dict(tma="bulk"), "tma must be one of"),
    (dict(page_size=32, block_n=64, tma="tile"), "tma=tile loads a stage with 5-D TMAs"),
    (dict(dtype="bf16_e4m3", qk="swap16", tma="tile"), "tma=tile loads a stage with 5-D TMAs"),
    (dict(qk="full_wg", pv="shared"), "pv must be one of"),
    (dict(tma="tile3"), "tma=tile3 .* full_wg and qreg schedules only"),
    (dict(qk="full_wg", page_size=32, block_n=64, tma="tile3"), "tma=tile3 loads a stage with 5-D TMAs"),
    (dict(tma="tile9"), "tma=tile9 .* full_wg and qreg schedules only"),
    (dict(qk="full_wg", block_n=64, stages=2, page_size=32, tma="tile9"), "tma=tile9 loads a stage with 5-D TMAs"),
    (dict(qk="qreg", num_warpgroups=3, block_n=64, stages=2, cluster=2, tma="tile9"), "tma=tile9 in the qreg schedules spills"),
    (dict(qk="qreg", num_warpgroups=3, block_n=64, stages=1), "one 64-token stage spills"),
    (dict(pv="regs"), "pv=regs: warpgroup 0 reads its own P from registers in the full_wg schedule only"),
    (dict(qk="full_wg_ahead", stages=2, pv="regs"), "full_wg schedule only"),
    (dict(qk="qreg", num_warpgroups=3, pv="regs"), "full_wg schedule only"),
    (dict(qk="full_wg_ahead", stages=2, cluster=2), "qreg and full_wg schedules only"),
    (dict(qk="full_wg", release="soon"), "release must be one of"),
    (dict(qk="full_wg", wg1_pv="late"), "wg1_pv must be one of"),
    (dict(release="early"), "reorder the full_wg schedule's warpgroup 0 only"),
    (dict(qk="full_wg_ahead", stages=2, release="early"), "reorder the full_wg schedule's warpgroup 0 only"),
    (dict(qk="qreg", num_warpgroups=3, wg1_pv="with_softmax"), "reorder the full_wg schedule's warpgroup 0 only"),
    (dict(qk="full_wg", tma="tile", producer="warp"), "producer must be one of"),
    (dict(tma="tile", producer="warpgroup"), "producer=warpgroup .* full_wg schedule .* got qk=nsplit"),
    (dict(qk="full_wg", producer="warpgroup"), "producer=warpgroup .* got qk=full_wg, tma=boxes"),
    (dict(qk="full_wg_ahead", stages=2, tma="tile", producer="warpgroup"),
     "producer=warpgroup .* got qk=full_wg_ahead"),
])
def test_invalid_variants_rejected(kwargs, why):
    with pytest.raises(InvalidVariant, match=why):
        Variant(**kwargs).validate()


def test_pv_and_full_wg_cluster_render_and_name():
    v = Variant(qk="full_wg", cluster=2, tma="tile", pv="regs").validate()
    assert v.key.endswith("_qf_x2_tt_pr") and v.build_key.endswith("_qf_x2_tt_pr")
    src = render(v)
    assert "static constexpr bool kPvRegs = true;" in src and "static constexpr int kCluster = 2;" in src
    assert "static constexpr bool kPvRegs = false;" in render(Variant(qk="full_wg").validate())
    old = Variant(qk="full_wg").as_dict()
    old.pop("pv")                          # a DB row written before the knob existed keeps its kernel
    assert Variant.from_dict(old).pv == "smem"


def test_release_and_wg1_pv_name_binaries_and_render_their_order():
    base = Variant(qk="full_wg", cluster=2, tma="tile3", pv="regs").validate()
    early = dataclasses.replace(base, release="early").validate()
    late_p = dataclasses.replace(base, wg1_pv="with_softmax").validate()
    both = dataclasses.replace(early, wg1_pv="with_softmax").validate()
    assert early.key == base.key + "_re" and late_p.key == base.key + "_ws" and both.key == base.key + "_re_ws"
    assert len({v.build_key for v in (base, early, late_p, both)}) == 4      # each reorder is its own binary
    assert "kReleaseEarly = false;" in render(base) and "kPvBehindQk = false;" in render(base)
    assert "kReleaseEarly = true;" in render(early) and "kPvBehindQk = true;" in render(late_p)
    old = base.as_dict()
    old.pop("release"), old.pop("wg1_pv")  # a DB row written before the knobs existed keeps its kernel
    assert Variant.from_dict(old) == base
    # release is searched, for full_wg only: the other schedules' points are not multiplied by it
    space = search_space()
    assert early in space and both not in space and variants_by_key([both.key]) == [both]
    without = search_space(knobs={k: v for k, v in KNOBS.items() if k != "release"})
    assert len(space) == len(without) + sum(v.qk == "full_wg" for v in without)
    assert all(v.release == "behind_qk" for v in space if v.qk != "full_wg")


def test_producer_warpgroup_names_a_binary_launches_a_third_warpgroup_and_is_not_searched():
    base = Variant(qk="full_wg", cluster=2, tma="tile3", pv="regs", release="early").validate()
    pw = dataclasses.replace(base, producer="warpgroup").validate()
    assert pw.key == base.key + "_pw" and pw.build_key == base.build_key + "_pw"
    assert (base.threads, pw.threads) == (256, 384)
    # the consumers' register cap is what setmaxnreg gives them, not the launch's share (65536 / 384 = 170)
    assert pw.reg_cap == CONSUMER_REGS and 128 * PRODUCER_REGS + 256 * CONSUMER_REGS <= 64 * 1024
    assert pw.smem_bytes() == base.smem_bytes()      # one more barrier, inside the 1024-byte rounding
    assert "kProducerWg = true;" in render(pw) and "kProducerWg = false;" in render(base)
    old = base.as_dict()
    old.pop("producer")                    # a DB row written before the knob existed keeps its kernel
    assert Variant.from_dict(old) == base
    assert pw not in search_space() and variants_by_key([pw.key]) == [pw]
    assert all(v.producer == "inline" for v in search_space())


def test_tile3_names_a_binary_and_renders_three_parts():
    tile = Variant(qk="full_wg", cluster=2, tma="tile", pv="regs", merge="wide_pdl").validate()
    three = Variant(**{**tile.as_dict(), "tma": "tile3"}).validate()
    assert three.key == tile.key.replace("_tt_", "_tt3_") and three.build_key.endswith("_x2_tt3_pr")
    assert three.smem_bytes() == tile.smem_bytes() and three.tile_parts == 3 and tile.tile_parts == 1
    src = render(three)
    assert "static constexpr bool kTmaTile = true;" in src and "static constexpr int kTileParts = 3;" in src
    assert "static constexpr int kTileParts = 1;" in render(tile)
    qreg = Variant(qk="qreg", num_warpgroups=3, block_n=32, stages=5, tma="tile3").validate()
    assert qreg.key.endswith("_qr_tt3") and variants_by_key([three.key, qreg.key]) == [three, qreg]
    # searched, and reached from a tile incumbent in one local step (tma is the first knob)
    assert three in search_space(page_size=64) and list(KNOBS)[0] == "tma"


def test_tile9_waits_per_chunk_and_is_built_but_not_searched():
    tile = Variant(qk="full_wg", cluster=2, tma="tile", pv="regs").validate()
    nine = Variant(**{**tile.as_dict(), "tma": "tile9"}).validate()
    assert nine.key == tile.key.replace("_tt_", "_tt9_") and nine.tile_parts == 9
    # eight more full barriers per stage fit in the 1 KiB-aligned tail the tile's barriers already take
    assert nine.smem_bytes() == tile.smem_bytes()
    src = render(nine)
    assert "static constexpr int kTileParts = 9;" in src and "static constexpr bool kTmaTile = true;" in src
    ahead = Variant(qk="full_wg_ahead", block_n=32, stages=3, tma="tile9").validate()
    assert variants_by_key([nine.key, ahead.key]) == [nine, ahead]
    assert nine not in search_space(page_size=64) and "tile9" not in KNOBS["tma"]


def test_qreg_shared_memory_mirrors_its_struct():
    # SharedStorageQreg: the ring, Q's 192 shared-memory channels, per-stage rescales (1024-aligned), + base slack
    v = Variant(block_n=64, stages=2, num_warpgroups=3, qk="qreg").validate()
    assert v.smem_bytes() == 2 * 64 * 576 * 2 + 64 * 192 * 2 + 2048 + 1024
    deep = Variant(block_n=32, stages=5, num_warpgroups=3, qk="qreg").validate()
    assert deep.smem_bytes() == 5 * 32 * 576 * 2 + 64 * 192 * 2 + 3072 + 1024
    assert v.threads == 384 and v.key.endswith("_qr") and v.accumulator_regs() == 128


def test_qreg_ahead_names_a_binary_with_the_qreg_footprint():
    plain = Variant(block_n=32, stages=5, num_warpgroups=3, qk="qreg", merge="wide_pdl").validate()
    ahead = Variant(**{**plain.as_dict(), "qk": "qreg_ahead"}).validate()
    assert ahead.key == plain.key + "a" and ahead.key.endswith("_qra")
    assert ahead.smem_bytes() == plain.smem_bytes() and ahead.accumulator_regs() == plain.accumulator_regs()
    assert "fmla::Qk::kQregAhead" in render(ahead) and "fmla::Qk::kQreg;" in render(plain)


def test_cluster_knob_names_a_binary_and_keeps_the_footprint():
    one = Variant(block_n=64, stages=2, num_warpgroups=3, qk="qreg", merge="wide_pdl").validate()
    two = Variant(**{**one.as_dict(), "cluster": 2}).validate()
    assert two.key == one.key + "_x2" and two.build_key == one.build_key + "_x2"
    assert two.smem_bytes() == one.smem_bytes() and Variant.from_dict(two.as_dict()) == two
    src = render(two)
    assert "static constexpr int kCluster = 2;" in src and "static constexpr int kCluster = 1;" in render(one)
    # Rows written before the knob existed (no "cluster" field) still name the unclustered kernel.
    old = one.as_dict()
    old.pop("cluster")
    assert Variant.from_dict(old) == one


def test_tma_knob_names_a_binary_and_keeps_the_footprint():
    boxes = Variant(block_n=64, stages=2, num_warpgroups=2, merge="wide_pdl").validate()
    tile = Variant(**{**boxes.as_dict(), "tma": "tile"}).validate()
    assert tile.key == boxes.key + "_tt" and tile.build_key == boxes.build_key + "_tt"
    assert tile.smem_bytes() == boxes.smem_bytes() and Variant.from_dict(tile.as_dict()) == tile
    assert "static constexpr bool kTmaTile = true;" in render(tile)
    assert "static constexpr bool kTmaTile = false;" in render(boxes)
    # 32-token stages inside 32-token pages take one box too; rows written before the knob existed name "boxes".
    Variant(page_size=32, block_n=32, stages=3, tma="tile").validate()
    old = boxes.as_dict()
    old.pop("tma")
    assert Variant.from_dict(old) == boxes
    assert variants_by_key([tile.key]) == [tile]


def test_every_variant_renders():
    for v in full_space():
        src = render(v)
        assert f"namespace fmla_{v.build_key}" in src
        assert "{{" not in src and "{%" not in src
        assert f"static constexpr int kBlockN = {v.block_n};" in src
        assert f"static constexpr int kStages = {v.stages};" in src
        assert f"static constexpr int kNumWarpgroups = {v.num_warpgroups};" in src
        assert "__global__" not in src.split("struct Config")[0]      # bodies live in the headers only


def test_ptxas_parser():
    report = """ptxas info    : Compiling entry function '_ZN3ns13decode_kernelE' for 'sm_90a'
ptxas info    : Function properties for _ZN3ns13decode_kernelE
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 16 bytes smem
ptxas info    : Compiling entry function '_ZN3ns14combine_kernelE' for 'sm_90a'
ptxas info    : Function properties for _ZN3ns14combine_kernelE
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 56 registers, used 0 barriers
"""
    r = ptxas.parse(report)
    assert r["decode_kernel"].registers == 168 and r["decode_kernel"].spills == 16
    assert r["decode_kernel"].static_smem == 16 and r["decode_kernel"].stack_frame == 8
    assert r["combine_kernel"].registers == 56 and r["combine_kernel"].spills == 0


def test_a_build_that_spills_or_serialises_its_wgmmas_may_not_be_measured(tmp_path):
    from flash_mla.codegen.build import Artifact
    clean = """ptxas info    : Compiling entry function '_ZN3ns13decode_kernelE' for 'sm_90a'
ptxas info    : Function properties for _ZN3ns13decode_kernelE
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 168 registers, used 10 barriers
"""
    spilling = clean.replace("0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads",
                             "40 bytes stack frame, 44 bytes spill stores, 44 bytes spill loads")
    serialised = clean + ("ptxas info    : (C7512) Potential Performance Loss: wgmma.mma_async instructions are "
                          "serialized due to insufficient register resources for the function '_ZN3ns13decode_kernelE'\n")
    verdicts = []
    for i, report in enumerate((clean, spilling, serialised)):
        a = Artifact(variant=default_variant(), directory=tmp_path / str(i), ok=True, resources=ptxas.parse(report))
        a.directory.mkdir()
        a.report_path.write_text(report)
        verdicts.append(a.rejection())
    assert verdicts[0] == ""
    assert "spills (44 B stored, 44 B loaded; 168 registers)" in verdicts[1]
    assert "C7512" in verdicts[2] and "serialized" in verdicts[2]
    failed = Artifact(variant=default_variant(), directory=tmp_path / "x", ok=False, error="nvcc: error")
    assert failed.rejection() == "compilation failed: nvcc: error"


# Compile-only subset: every value of every knob and trait appears at least once.
COMPILE_SUBSET = [
    Variant(dtype="bf16", page_size=64, block_n=64, stages=1, num_warpgroups=2),
    Variant(dtype="fp16", page_size=32, block_n=64, stages=2, num_warpgroups=2, merge="wide_pdl", qk="full_wg",
            wg1_pv="with_softmax"),
    Variant(dtype="bf16", page_size=32, block_n=32, stages=3, num_warpgroups=4, merge="wide_pdl"),
    Variant(dtype="fp16", page_size=64, block_n=32, stages=4, num_warpgroups=4),
    Variant(dtype="bf16", page_size=64, block_n=32, stages=3, num_warpgroups=2, merge="wide_pdl", qk="full_wg_ahead",
            tma="tile9"),
    Variant(dtype="bf16", page_size=64, block_n=64, stages=2, num_warpgroups=2, merge="wide_pdl", qk="swap16"),
    Variant(dtype="bf16_e4m3", page_size=32, block_n=64, stages=1, num_warpgroups=2, qk="swap32", widen="ahead"),
    Variant(dtype="fp16", page_size=32, block_n=32, stages=5, num_warpgroups=3, merge="wide_pdl", qk="qreg_ahead"),
    Variant(dtype="bf16", page_size=64, block_n=64, stages=2, num_warpgroups=3, qk="qreg", cluster=2),
    Variant(dtype="bf16", page_size=64, block_n=64, stages=2, num_warpgroups=2, merge="wide_pdl", tma="tile"),
    Variant(dtype="bf16", page_size=64, block_n=64, stages=2, num_warpgroups=2, qk="full_wg", cluster=2, tma="tile3",
            pv="regs", release="early", producer="warpgroup"),
]


# Ceilings pinned from nvcc 13.0's ptxas report; they may only go down. The one-stage, two-warpgroup
# 64-token variant sits at the 255-register cap of the 64x512 fp32 accumulator design.
# qreg_ahead (warpgroup 0 at the 168-register cap with two S tiles) spills at each request's start (around Q's
# register load) and in the peeled last tiles, never in the paired tile loop (cuobjdump of this binary and of
# bf16_p64_n32_s5_w3_c4_mwide_qra, nvcc 13.0).
SPILL_CEILING_BYTES = {"bf16_p64_n64_s1_w2_c4_msep": 52, "fp16_p32_n32_s5_w3_c4_mwide_qra": 60}


def test_serialised_wgmma_notes_are_found():
    report = ("ptxas info    : (C7518) Potential Performance Loss: wgmma.mma_async instructions are serialized due "
              "to program dependence on compiler-inserted WG.DP in divergent path in the function '_Z3fooi'\n"
              "ptxas info    : Used 255 registers, used 10 barriers\n")
    assert ptxas.serialised_wgmma(report) == ["C7518: wgmma.mma_async instructions are serialized due to program "
                                        "dependence on compiler-inserted WG.DP in divergent path"]
    assert ptxas.serialised_wgmma("ptxas info    : Used 128 registers\n") == []


def test_compile_subset_covers_every_knob():
    for knob, values in {**ALL_KNOBS, "dtype": DTYPES, "page_size": (64, 32)}.items():
        if knob in ("split_overhead", "split_min_blocks"):     # launch-time knobs: no code difference
            continue
        assert {getattr(v, knob) for v in COMPILE_SUBSET} >= set(values), knob


def _cuobjdump():
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    for cand in (os.path.join(home, "bin", "cuobjdump"), shutil.which("cuobjdump")):
        if cand and os.path.exists(cand):
            return cand
    try:  # PyPI: nvidia-cuda-cuobjdump installs nvidia/cu*/bin/cuobjdump
        import glob
        import nvidia
        for root in nvidia.__path__:
            hits = sorted(glob.glob(os.path.join(root, "*", "bin", "cuobjdump")))
            if hits:
                return hits[-1]
    except ImportError:
        pass
    return None


@pytest.mark.nvcc
def test_compile_subset_resources(tmp_path_factory):
    from flash_mla.codegen.build import build
    os.environ.setdefault("FLASH_MLA_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    arts = build(COMPILE_SUBSET, jobs=os.cpu_count() or 1)
    cuobjdump = _cuobjdump()
    for a in arts:
        assert a.ok, a.error
        dec = a.resources["decode_kernel"]
        ceiling = SPILL_CEILING_BYTES.get(a.variant.build_key, 0)
        assert dec.spills <= ceiling and dec.stack_frame <= ceiling, (a.variant.key, dec)
        assert a.variant.smem_bytes() <= SMEM_LIMIT
        assert dec.registers <= min(255, 65536 // a.variant.threads)
        assert a.resources["combine_kernel"].spills == 0
        assert not ptxas.serialised_wgmma(a.report_path.read_text()), (a.variant.key, ptxas.serialised_wgmma(a.report_path.read_text()))
        if cuobjdump:
            env = {**os.environ, "PATH": os.path.dirname(cuobjdump) + os.pathsep + os.environ.get("PATH", "")}
            proc = subprocess.run([cuobjdump, "-sass", str(a.library)], capture_output=True, text=True, env=env)
            assert proc.returncode == 0, proc.stderr
            sass = proc.stdout
            assert re.search(r"\bHGMMA\.", sass), f"{a.variant.key}: no HGMMA in SASS"
            assert "UTMALDG" in sass, f"{a.variant.key}: no TMA load in SASS"
    if not cuobjdump:
        pytest.skip("cuobjdump not found (pip install nvidia-cuda-cuobjdump): SASS not inspected")


def test_variants_by_key_keeps_order_and_names_unknown_keys():
    from flash_mla.codegen.variant import variants_by_key
    a, b = full_space()[3], full_space()[0]
    assert variants_by_key([a.key, b.key]) == [a, b]
    with pytest.raises(ValueError, match="unknown variant keys: \\['nope'\\]"):
        variants_by_key([a.key, "nope"])


def test_kernel_constants_agree_with_the_python_module():
    import re
    from flash_mla.codegen.render import static_headers
    from flash_mla.constants import KERNEL_CONSTANTS
    text = static_headers()["kernels/mla_constants.h"]
    found = {m.group(1): int(m.group(2)) for m in re.finditer(r"constexpr int (k\w+) = (\d+);", text)}
    assert found == KERNEL_CONSTANTS


def test_trace_builds_render_their_stamps_and_entry_points():
    plain = Variant(block_n=64, stages=2, num_warpgroups=3, qk="qreg", merge="wide_pdl").validate()
    traced = Variant(**{**plain.as_dict(), "trace": True}).validate()
    assert traced.key == plain.key + "_trace" and traced.build_key == plain.build_key + "_trace"
    src = render(traced)
    assert "#define FMLA_TRACE 1" in src and "FMLA_TIMELINE" not in src
    assert "fmla_trace_read" in src and "fmla_trace_clear" in src
    assert "FMLA_TRACE" not in render(plain) and "fmla_trace" not in render(plain)
    # nsplit: the start-up timeline of every CTA (bench/timeline.py), same entry points
    timeline = render(Variant(merge="wide_pdl", trace=True).validate())
    assert "#define FMLA_TIMELINE 1" in timeline and "FMLA_TRACE" not in timeline and "fmla_trace_read" in timeline
    with pytest.raises(InvalidVariant, match="qreg and nsplit schedules only"):
        Variant(qk="full_wg", trace=True).validate()
