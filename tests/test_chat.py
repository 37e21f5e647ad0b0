"""A chat's prompt: the user's turns, whatever form the chat comes in."""
import pytest

from pipeline.chat import NotText, chat_prompt


@pytest.mark.parametrize("turns, prompt", [
    (["Hi", None, "again"], "Hi\n\nagain"),  # plain strings are the user's; a missing turn is skipped
    ([{"content": "no role"}, {"from": "Human", "value": "sharegpt"}, {"role": "user", "text": "text key"}],
     "no role\n\nsharegpt\n\ntext key"),
    ([{"role": "system", "content": "rules"}, {"role": "developer", "content": "more rules"},
      {"role": "assistant", "content": [1, 2]}, {"role": "user", "content": None}], ""),  # others are never read
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}, {"text": "untyped part"}]}], "untyped part"),
])
def test_the_prompt_is_the_users_turns(turns, prompt):
    assert chat_prompt(turns) == prompt


@pytest.mark.parametrize("turns, where", [
    ("not a list", "a chat must be a list of turns"),
    ([3], "[0] must be a string or an object"),
    ([{"role": 1, "content": "x"}], "[0].role must be a string"),
    ([{"role": "user"}], "[0] has no content"),
    ([{"role": "user", "content": {"text": "x"}}], "[0].content must be a string or a list of parts"),
    ([{"role": "user", "content": [7]}], "[0].content[0] must be an object"),
    ([{"role": "user", "content": [{"type": "text", "text": None}]}], "[0].content[0].text must be a string"),
])
def test_what_cannot_be_read_is_named(turns, where):
    with pytest.raises(NotText) as e:
        chat_prompt(turns)
    assert str(e.value) == where
