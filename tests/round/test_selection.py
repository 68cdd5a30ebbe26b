from fl_components.federation import select_participants

NAMES = tuple(f"s{i:02d}" for i in range(100))


def test_secret_selection_cannot_be_replayed_from_the_seed() -> None:
    draws = {
        select_participants(NAMES, fraction=0.1, minimum=2, round_num=1, seed=0, secret=True)
        for _ in range(5)
    }
    public = select_participants(NAMES, fraction=0.1, minimum=2, round_num=1, seed=0)

    assert len(draws) == 5  # 2^100 Poisson cohorts: a repeat means the draw is seeded
    # Poisson sampling (q = 0.1): sizes vary around 10 (tests/privacy pins the rate)
    assert all(len(d) < 40 for d in draws)
    assert public == select_participants(NAMES, fraction=0.1, minimum=2, round_num=1, seed=0)
