"""benchmarks/tf32_accuracy.py rounds matrix factors to TF32 exactly as the hardware's conversion does."""

import torch

from benchmarks.tf32_accuracy import EmulatedTF32, round_to_tf32


def test_rounds_to_ten_mantissa_bits_nearest_ties_away():
    unit = 2.0**-10  # TF32's last mantissa bit at 1.0
    values = torch.tensor([1.0, 1 + unit, 1 + unit / 4, 1 + unit / 2, 1 + 3 * unit / 4, -(1 + unit / 2), 3.0e-3])
    expected = torch.tensor([1.0, 1 + unit, 1.0, 1 + unit, 1 + unit, -(1 + unit), 1573 * 2.0**-19])  # 3e-3 = 1572.86 units of 2^-19
    assert torch.equal(round_to_tf32(values), expected)


def test_rounds_the_factors_of_products_with_a_large_enough_inner_dimension():
    generator = torch.Generator().manual_seed(0)
    wide = torch.randn(4, 32, generator=generator), torch.randn(32, 5, generator=generator)
    narrow = torch.randn(4, 3, generator=generator), torch.randn(3, 5, generator=generator)
    with EmulatedTF32(min_inner=16):
        wide_product, narrow_product = wide[0] @ wide[1], narrow[0] @ narrow[1]
    assert torch.equal(wide_product, round_to_tf32(wide[0]) @ round_to_tf32(wide[1]))
    assert not torch.equal(wide_product, wide[0] @ wide[1])
    assert torch.equal(narrow_product, narrow[0] @ narrow[1])
