"""``roar.core.sorting``: NumPy's sorts on the CPU give torch's values and scipy's average ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import rankdata

from roar.core.sorting import row_order, sorted_rows, twice_average_ranks


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_sorted_rows_and_order_agree_with_torch(dtype):
    x = torch.randint(0, 6, (5, 40), generator=torch.Generator().manual_seed(1)).to(dtype)  # many ties
    assert torch.equal(sorted_rows(x), x.sort(dim=1).values)
    assert torch.equal(x.gather(1, row_order(x)), x.sort(dim=1).values)


@pytest.mark.parametrize("levels", [1, 3, 1000])
def test_twice_average_ranks_equal_twice_scipys_rankdata(levels):
    x = torch.randint(0, levels, (6, 33), generator=torch.Generator().manual_seed(levels)).double()
    x[0, :5] = -0.0  # equal to 0.0
    expected = 2 * rankdata(x.numpy(), method="average", axis=1)
    assert np.array_equal(twice_average_ranks(x).numpy(), expected.astype(np.int64))
    assert np.array_equal(twice_average_ranks(x.float()).numpy(), expected.astype(np.int64))
