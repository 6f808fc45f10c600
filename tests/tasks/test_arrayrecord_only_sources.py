"""Tasks that need random access to a catalogue refuse a streamed `data.source` in one line, and
take `arrayrecord:DIR` as their dataset directory."""
import pytest

from mmcl.config import ConfigError
from mmcl.tasks import get_task_class, make_config


@pytest.mark.parametrize("name,catalogue", [("mmsrec", "item catalogue"),
                                            ("demure", "item catalogue"),
                                            ("artist_retrieval", "artist catalogue")])
def test_streamed_source_is_refused_in_one_line(name, catalogue, tmp_path):
  from mmcl.cli import _exit_code
  c = make_config(name)
  c.data.source = "parquet:/data/{split}/*.parquet"
  with pytest.raises(ConfigError, match=rf"config key 'data.source' = "
                                        rf"'parquet:/data/\{{split\}}/\*\.parquet': this task reads "
                                        rf"ArrayRecord datasets only \(it needs random access to "
                                        rf"the {catalogue}.*which a parquet stream cannot give\)"
                     ) as e:
    get_task_class(name)(c, None)
  assert _exit_code(e.value) == 2 and "\n" not in str(e.value)
  # arrayrecord:DIR names the dataset directory (here a missing one, reported as such).
  c.data.source = f"arrayrecord:{tmp_path}/absent"
  with pytest.raises(Exception) as e:
    get_task_class(name)(c, None)
  assert f"{tmp_path}/absent" in str(e.value) and c.data.dir == f"{tmp_path}/absent"
