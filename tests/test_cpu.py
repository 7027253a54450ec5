"""common.cpu: the CPU model and flags that the int8, bf16 and path-choice decisions read."""
from common.cpu import cpu_flags, cpu_model

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14
flags\t\t: fpu sse4_2 avx2 fma avx512f avx512_vnni avx512_bf16
bugs\t\t: sysret_ss_attrs

processor\t: 1
model name\t: AMD EPYC 9R14
flags\t\t: fpu sse4_2 avx2
"""


def test_flags_and_model_of_the_first_processor():
    assert cpu_flags(CPUINFO) == {"fpu", "sse4_2", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"}
    assert "sysret_ss_attrs" not in cpu_flags(CPUINFO)        # the "bugs" line is not flags
    assert cpu_model(CPUINFO) == "AMD EPYC 9R14"


def test_text_without_a_flags_line_is_read_as_flags():
    assert cpu_flags("fpu avx2") == {"fpu", "avx2"}
    assert cpu_model("fpu avx2") == ""
