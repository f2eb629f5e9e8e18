"""The node, a bag player and a recorder on Eclipse Cyclone DDS, without ROS 2 installed.

ROS 2 topics are DDS topics: a topic ``/detections`` of type ``vision_msgs/msg/Detection2DArray``
is the DDS topic ``rt/detections`` of type ``vision_msgs::msg::dds_::Detection2DArray_``, its
samples in XCDR1 little-endian, the layout rosbags serialises too. This subpackage speaks that
directly with the ``cyclonedds`` Python package (the DDS behind ``rmw_cyclonedds_cpp``), so the
node core runs where rclpy does not (development machines, CI, a TX2 on JetPack 4) and talks to
ROS 2 nodes on the same domain.

- :mod:`.types`: IDL structs with ROS 2 type names, built from the message definitions, for every
  message the node, the player and the recorder exchange, with a fast path for ``uint8[]``
  payloads (see :mod:`.types`).
- :mod:`.convert`: IDL samples <-> the rosbags messages that the node core and the bag tools use.
- :mod:`.runtime`: participant, ROS 2 topic naming, QoS profiles, publishers and readers.
- :mod:`.node`, :mod:`.play`, :mod:`.record`: the ``node``, ``play`` and ``record`` commands.

Only the modules that need it import ``cyclonedds``; the command modules import it when they
run, so ``--help`` works without it and its absence gives one clear message (:func:`require`).
"""

from __future__ import annotations

from dds_perception.utils.errors import DdsPerceptionError

INSTALL_HINT = "pip install 'dds_perception[dds]'"


class DdsError(DdsPerceptionError, RuntimeError):
    """The DDS runtime cannot do what was asked (library missing, unknown type or topic)."""


def require() -> None:
    """Raise :class:`DdsError` with the install command when ``cyclonedds`` is absent."""
    try:
        import cyclonedds  # noqa: F401
    except ImportError as error:
        raise DdsError(
            f"the Cyclone DDS runtime needs the cyclonedds package ({error}); {INSTALL_HINT}"
        ) from error
