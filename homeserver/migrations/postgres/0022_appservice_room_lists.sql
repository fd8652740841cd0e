-- Application services' own room directories (the spec's "application service room
-- directories"): rooms a service lists for one of its networks. `/publicRooms` shows them for
-- `third_party_instance_id = "<appservice_id>|<network_id>"`, and with `include_all_networks`.
CREATE TABLE appservice_room_lists (
    appservice_id TEXT NOT NULL,
    network_id    TEXT NOT NULL,
    room_id       TEXT NOT NULL,
    PRIMARY KEY (appservice_id, network_id, room_id)
);
