"""The architectures, as data: each family's stages of block strings (see _builder.py) and each
model name's scaling, with timm's names and conventions."""
from __future__ import annotations

ARCHS = {
    "mobilenetv1": [
        ["dsa_r1_k3_s1_c64"], ["dsa_r2_k3_s2_c128"], ["dsa_r2_k3_s2_c256"],
        ["dsa_r6_k3_s2_c512"], ["dsa_r2_k3_s2_c1024"],
    ],
    "mobilenetv2": [
        ["ds_r1_k3_s1_c16"], ["ir_r2_k3_s2_e6_c24"], ["ir_r3_k3_s2_e6_c32"],
        ["ir_r4_k3_s2_e6_c64"], ["ir_r3_k3_s1_e6_c96"], ["ir_r3_k3_s2_e6_c160"],
        ["ir_r1_k3_s1_e6_c320"],
    ],
    "mobilenetv3_large": [
        ["ds_r1_k3_s1_e1_c16_nre"], ["ir_r1_k3_s2_e4_c24_nre", "ir_r1_k3_s1_e3_c24_nre"],
        ["ir_r3_k5_s2_e3_c40_se0.25_nre"],
        ["ir_r1_k3_s2_e6_c80", "ir_r1_k3_s1_e2.5_c80", "ir_r2_k3_s1_e2.3_c80"],
        ["ir_r2_k3_s1_e6_c112_se0.25"], ["ir_r3_k5_s2_e6_c160_se0.25"], ["cn_r1_k1_s1_c960"],
    ],
    "mobilenetv3_small": [
        ["ds_r1_k3_s2_e1_c16_se0.25_nre"],
        ["ir_r1_k3_s2_e4.5_c24_nre", "ir_r1_k3_s1_e3.67_c24_nre"],
        ["ir_r1_k5_s2_e4_c40_se0.25", "ir_r2_k5_s1_e6_c40_se0.25"],
        ["ir_r2_k5_s1_e3_c48_se0.25"], ["ir_r3_k5_s2_e6_c96_se0.25"], ["cn_r1_k1_s1_c576"],
    ],
    "mixnet_s": [
        ["ds_r1_k3_s1_e1_c16"],
        ["ir_r1_k3_a1.1_p1.1_s2_e6_c24", "ir_r1_k3_a1.1_p1.1_s1_e3_c24"],
        ["ir_r1_k3.5.7_s2_e6_c40_se0.5_nsw", "ir_r3_k3.5_a1.1_p1.1_s1_e6_c40_se0.5_nsw"],
        ["ir_r1_k3.5.7_p1.1_s2_e6_c80_se0.25_nsw", "ir_r2_k3.5_p1.1_s1_e6_c80_se0.25_nsw"],
        ["ir_r1_k3.5.7_a1.1_p1.1_s1_e6_c120_se0.5_nsw",
         "ir_r2_k3.5.7.9_a1.1_p1.1_s1_e3_c120_se0.5_nsw"],
        ["ir_r1_k3.5.7.9.11_s2_e6_c200_se0.5_nsw", "ir_r2_k3.5.7.9_p1.1_s1_e6_c200_se0.5_nsw"],
    ],
    "mixnet_m": [
        ["ds_r1_k3_s1_e1_c24"],
        ["ir_r1_k3.5.7_a1.1_p1.1_s2_e6_c32", "ir_r1_k3_a1.1_p1.1_s1_e3_c32"],
        ["ir_r1_k3.5.7.9_s2_e6_c40_se0.5_nsw", "ir_r3_k3.5_a1.1_p1.1_s1_e6_c40_se0.5_nsw"],
        ["ir_r1_k3.5.7_s2_e6_c80_se0.25_nsw", "ir_r3_k3.5.7.9_a1.1_p1.1_s1_e6_c80_se0.25_nsw"],
        ["ir_r1_k3_s1_e6_c120_se0.5_nsw", "ir_r3_k3.5.7.9_a1.1_p1.1_s1_e3_c120_se0.5_nsw"],
        ["ir_r1_k3.5.7.9_s2_e6_c200_se0.5_nsw", "ir_r3_k3.5.7.9_p1.1_s1_e6_c200_se0.5_nsw"],
    ],
    "efficientnet": [
        ["ds_r1_k3_s1_e1_c16_se0.25"], ["ir_r2_k3_s2_e6_c24_se0.25"],
        ["ir_r2_k5_s2_e6_c40_se0.25"], ["ir_r3_k3_s2_e6_c80_se0.25"],
        ["ir_r3_k5_s1_e6_c112_se0.25"], ["ir_r4_k5_s2_e6_c192_se0.25"],
        ["ir_r1_k3_s1_e6_c320_se0.25"],
    ],
    "mnasnet_b1": [
        ["ds_r1_k3_s1_c16_noskip"], ["ir_r3_k3_s2_e3_c24"], ["ir_r3_k5_s2_e3_c40"],
        ["ir_r3_k5_s2_e6_c80"], ["ir_r2_k3_s1_e6_c96"], ["ir_r4_k5_s2_e6_c192"],
        ["ir_r1_k3_s1_e6_c320_noskip"],
    ],
    "mnasnet_a1": [
        ["ds_r1_k3_s1_e1_c16_noskip"], ["ir_r2_k3_s2_e6_c24"],
        ["ir_r3_k5_s2_e3_c40_se0.25"], ["ir_r4_k3_s2_e6_c80"], ["ir_r2_k3_s1_e6_c112_se0.25"],
        ["ir_r3_k5_s2_e6_c160_se0.25"], ["ir_r1_k3_s1_e6_c320"],
    ],
    "mnasnet_small": [
        ["ds_r1_k3_s1_c8"], ["ir_r1_k3_s2_e3_c16"], ["ir_r2_k3_s2_e6_c16"],
        ["ir_r4_k5_s2_e6_c32_se0.25"], ["ir_r3_k3_s1_e6_c32_se0.25"],
        ["ir_r3_k5_s2_e6_c88_se0.25"], ["ir_r1_k3_s1_e6_c144"],
    ],
}

# EfficientNet compound scaling (width, depth, resolution) of the one base definition above.
EFFICIENTNET_SCALING = {
    "b0": (1.0, 1.0, 224), "b1": (1.0, 1.1, 240), "b2": (1.1, 1.2, 260),
    "b3": (1.2, 1.4, 300), "b4": (1.4, 1.8, 380), "b5": (1.6, 2.2, 456),
    "b6": (1.8, 2.6, 528), "b7": (2.0, 3.1, 600),
}


def _family(arch, **kw):
    return dict(arch=arch, **kw)


def _models() -> dict:
    """name -> keyword arguments of models._build (family defaults, then the name's scaling)."""
    m = {}
    mnv1 = dict(arch="mobilenetv1", stem=32, act="relu6", num_features=0)
    m["mobilenetv1_100"] = dict(mnv1, width=1.0)
    m["mobilenetv1_100h"] = dict(mnv1, width=1.0, num_features=1024)
    m["mobilenetv1_125"] = dict(mnv1, width=1.25)
    mnv2 = dict(arch="mobilenetv2", stem=32, act="relu6", num_features=1280,
                scale_head=True)
    for name, w in (("035", 0.35), ("050", 0.5), ("075", 0.75), ("100", 1.0), ("140", 1.4)):
        m[f"mobilenetv2_{name}"] = dict(mnv2, width=w)
    for name, w, d in (("110d", 1.1, 1.2), ("120d", 1.2, 1.4)):
        m[f"mobilenetv2_{name}"] = dict(mnv2, width=w, depth=d, fix_stem_head=True)
    mnv3 = dict(stem=16, act="hswish", head="mobilenetv3", se_from_exp=True,
                se_round="make_divisible", se_act="relu", se_gate="hsigmoid")
    for name, w, d in (("075", 0.75, 1.0), ("100", 1.0, 1.0), ("150d", 1.5, 1.2)):
        m[f"mobilenetv3_large_{name}"] = dict(mnv3, arch="mobilenetv3_large", width=w,
                                               depth=d, num_features=1280)
    for name, w in (("050", 0.5), ("075", 0.75), ("100", 1.0)):
        m[f"mobilenetv3_small_{name}"] = dict(mnv3, arch="mobilenetv3_small", width=w,
                                               num_features=1024)
    mixnet = dict(act="relu", num_features=1536)
    tf = dict(eps=1e-3, same=True)
    m["mixnet_s"] = dict(mixnet, arch="mixnet_s", stem=16)
    mixm = dict(mixnet, arch="mixnet_m", stem=24, depth_trunc="round")
    for name, w, d in (("m", 1.0, 1.0), ("l", 1.3, 1.0), ("xl", 1.6, 1.2), ("xxl", 2.4, 1.3)):
        m[f"mixnet_{name}"] = dict(mixm, width=w, depth=d)
    m["tf_mixnet_s"] = dict(m["mixnet_s"], **tf)
    m["tf_mixnet_m"] = dict(m["mixnet_m"], **tf)
    m["tf_mixnet_l"] = dict(m["mixnet_l"], **tf)
    for b, (w, d, res) in EFFICIENTNET_SCALING.items():
        m[f"efficientnet_{b}"] = dict(arch="efficientnet", stem=32, act="silu", width=w,
                                      depth=d, resolution=res, num_features=1280,
                                      scale_head=True, head_always_scaled=True)
    for name, w in (("050", 0.5), ("075", 0.75), ("100", 1.0), ("140", 1.4)):
        m[f"mnasnet_{name}"] = dict(arch="mnasnet_b1", stem=32, act="relu", width=w,
                                    num_features=1280)
        m[f"semnasnet_{name}"] = dict(arch="mnasnet_a1", stem=32, act="relu", width=w,
                                      num_features=1280)
    m["mnasnet_small"] = dict(arch="mnasnet_small", stem=8, act="relu", width=1.0,
                              num_features=1280)
    return m


MODELS = _models()
