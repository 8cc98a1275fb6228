"""Stage 3, the scores: G-SNR and its ablations as pure formulas over the record (`scoring`), the
`datasets.map` scorers (`scorer`, `baselines`), the score stage that trains the proxy and writes the
scored rows (`stage`), its checks (`checks`), and re-scoring on a grid of settings (`sweep`)."""
