from easllm.engine.stop import StopMatcher


def run(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    m = StopMatcher(stops)
    out = "".join(m.push(p) for p in pieces)
    return out + m.flush(), m.stopped


def test_no_stops_passes_through() -> None:
    assert run([], ["a", "b"]) == ("ab", False)


def test_stop_inside_one_piece() -> None:
    assert run(["END"], ["hello END world"]) == ("hello ", True)


def test_stop_split_across_pieces_is_never_emitted() -> None:
    m = StopMatcher(["</s>"])
    assert m.push("hi <") == "hi "
    assert m.push("/") == ""
    assert m.push("s>tail") == ""
    assert m.stopped


def test_partial_match_that_fails_is_released() -> None:
    assert run(["STOP"], ["a ST", "ART b"]) == ("a START b", False)


def test_earliest_of_several_stops_wins() -> None:
    assert run(["\n\n", "User:"], ["x User: y\n\n"]) == ("x ", True)


def test_held_text_is_flushed_at_the_end() -> None:
    assert run(["ABC"], ["xxAB"]) == ("xxAB", False)
